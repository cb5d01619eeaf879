"""TrainConfig classifies every setting for `--resume`, and the comparison names each change."""

from __future__ import annotations

import dataclasses

import pytest

from student_trainer.config import (
    MAY_CHANGE,
    MUST_MATCH,
    RESUME,
    TrainConfig,
    changed_settings,
    classified,
    trained_settings,
)

FREE = {
    "out", "resume", "checkpoint_every", "eval_every", "progress", "log_every", "save_model",
    "device", "allow_vocab_extension", "skip_bad_shards", "storage_options", "strict_temperature",
}  # fmt: skip
"""Where a run writes, how often it reports, where it runs, what it tolerates: a resume may
change these. Everything else changes what is trained (or what its evaluations measure)."""


def test_every_setting_says_what_resume_may_do_with_it() -> None:
    kinds = {f.name: f.metadata[RESUME] for f in dataclasses.fields(TrainConfig)}
    assert {name for name, kind in kinds.items() if kind == MAY_CHANGE[RESUME]} == FREE
    assert {name for name, kind in kinds.items() if kind == MUST_MATCH[RESUME]} == set(kinds) - FREE


def test_an_unclassified_setting_is_refused_when_the_config_is_defined() -> None:
    @dataclasses.dataclass
    class Config:
        lr: float = dataclasses.field(default=0.1, metadata=MUST_MATCH)
        new_knob: int = 0

    with pytest.raises(TypeError, match="new_knob must say what --resume may do with it"):
        classified(Config)


def settings(cfg: TrainConfig, cache: str = "sha256:aaaa", world: int = 1) -> dict:
    return trained_settings(cfg, cache=cache, eval_cache=None, world=world)


def test_changes_to_what_is_trained_are_named_with_old_and_new_values() -> None:
    old = TrainConfig(cache="a", out="run")
    new = dataclasses.replace(
        old, lr=0.01, seed=3, loss_options={"temperature": 2.0}, max_steps=10, out="elsewhere"
    )
    changes = changed_settings(settings(old), settings(new), old.to_json(), new.to_json())
    assert changes == [
        "--loss-option unset -> temperature=2.0",
        "--lr 0.001 -> 0.01",
        "--max-steps unset -> 10",
        "--seed 0 -> 3",
    ]


def test_a_cache_is_compared_by_its_fingerprint_not_its_url() -> None:
    old, moved = (
        TrainConfig(cache="/data/c", out="run"),
        TrainConfig(cache="/elsewhere/c", out="run"),
    )
    assert changed_settings(settings(old), settings(moved), old.to_json(), moved.to_json()) == []
    other = settings(old, cache="sha256:bbbb")
    assert changed_settings(settings(old), other, old.to_json(), old.to_json()) == [
        "--cache /data/c (fingerprint sha256:aaaa) -> /data/c (fingerprint sha256:bbbb)"
    ]


def test_harmless_changes_pass_and_worker_counts_that_read_alike_are_one() -> None:
    old = TrainConfig(cache="c", out="run", num_workers=0)
    new = dataclasses.replace(
        old, num_workers=1, eval_every=5, checkpoint_every=2, device="cpu", progress=False,
        log_every=1, save_model=False, skip_bad_shards=True,
    )  # fmt: skip
    assert changed_settings(settings(old), settings(new), old.to_json(), new.to_json()) == []
    two = dataclasses.replace(old, num_workers=2)
    assert changed_settings(settings(old), settings(two), {}, {}) == ["--num-workers 1 -> 2"]
    assert changed_settings(settings(old), settings(old, world=2), {}, {}) == [
        "ranks (torchrun processes) 1 -> 2"
    ]
