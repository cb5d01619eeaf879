"""What a training run logs: metrics.jsonl always, TensorBoard events when tensorboard is
installed, and the same run without it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from student_trainer import TrainConfig, train

pytestmark = pytest.mark.integration

STEP_TAGS = {"loss", "grad_norm", "lr", "tokens", "tokens_per_s"}
"""The scalars every logged step writes."""


def short_run(cache: str, student: str, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        cache=cache,
        out=str(out),
        student_config=student,
        loss="fkl-tail",
        max_steps=3,
        batch_tokens=192,
        log_every=1,
        save_model=False,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_logged_scalar(small_cache, fresh_student, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(short_run(small_cache, fresh_student, out, eval_cache=small_cache, eval_tokens=192))

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert STEP_TAGS | {"eval_ce", "eval_kl_topk", "eval_top1_agreement"} <= tags
    logged = rows(out)
    for tag in STEP_TAGS:
        expected = [(r["step"], r[tag]) for r in logged if tag in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3]
        for (_, value), (_, want) in zip(got, expected, strict=True):
            assert value == pytest.approx(want, rel=1e-6)  # events store float32
    assert [e.step for e in events.Scalars("eval_ce")] == [0, 3]


def test_training_without_tensorboard_still_logs_metrics(
    small_cache, fresh_student, tmp_path, monkeypatch
):
    # None in sys.modules makes `from torch.utils.tensorboard import SummaryWriter` raise
    # ImportError, as it does where tensorboard is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    result = train(short_run(small_cache, fresh_student, out))
    assert result.steps == 3
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert not (out / "tensorboard").exists()
