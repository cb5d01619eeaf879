"""Compact samples (format 3.0) and samples-only caches, as a user runs them: `kdcache build
--samples N` stores only the draws outside the top-k, `--top-k 0 --samples N` only samples;
inspect, validate --deep and train read both, in fresh processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from schemas import open_cache
from tests.fixtures.caches import pydoc_jsonl
from tests.fixtures.cli import kdcache, one_line_error


@pytest.fixture(scope="module")
def caches(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compact")
    data = pydoc_jsonl(root / "docs.jsonl", 6, 1200)
    common = ["--teacher", str(tiny_llama_dir), "--dataset", str(data), "--max-length", "96"]
    common += ["--shard-tokens", "1024", "--batch-tokens", "384", "--no-progress", "--seed", "3"]
    made = {}
    for name, extra in (
        ("topk", ["--top-k", "8", "--samples", "16"]),
        ("only", ["--top-k", "0", "--samples", "16"]),
        ("plain", ["--top-k", "8"]),
    ):
        made[name] = root / name
        kdcache("build", *common, *extra, "--out", str(made[name]))
    return made


def test_versions_say_what_a_reader_needs(caches: dict[str, Path]) -> None:
    """Compact samples need 3.0; a cache without samples stays 2.0 (kdcache 0.2 reads it)."""
    versions = {
        name: json.loads((path / "manifest.json").read_text())["schema_version"]
        for name, path in caches.items()
    }
    assert versions == {"topk": "3.0", "only": "3.0", "plain": "2.0"}
    layout = json.loads((caches["plain"] / "manifest.json").read_text())["layout"]
    assert "compact_samples" not in layout  # a 2.0 reader's exact layout


def test_only_the_draws_outside_the_top_k_are_listed(caches: dict[str, Path]) -> None:
    with_topk = open_cache(str(caches["topk"]))
    only = open_cache(str(caches["only"]))
    assert with_topk.layout.compact_samples and only.layout.k == 0
    listed = drawn = 0
    for a, b in zip(with_topk, only, strict=True):
        real = a.sample_counts > 0
        inside = (a.sample_ids[:, :, None] == a.topk_ids[:, None, :]).any(-1)
        assert not (inside & real).any()
        assert (a.sample_counts.sum(1) <= 16).all() and (b.sample_counts.sum(1) == 16).all()
        lp = np.where(real, a.sample_logprobs, -np.inf)
        with np.errstate(invalid="ignore"):
            assert not (np.diff(lp, axis=1) > 0).any()  # by descending log-prob, padding last
        assert b.topk_ids.shape[1] == 0 and (b.log_tail == 0).all()
        listed += int(a.sample_counts.sum())
        drawn += a.sample_counts.size // 16 * 16
    assert 0 < listed < drawn  # some draws fell inside the top-8, some outside


def test_compact_samples_take_fewer_bytes_than_the_top_k(caches: dict[str, Path]) -> None:
    per_token = {
        name: open_cache(str(path)).manifest.nbytes / open_cache(str(path)).manifest.num_tokens
        for name, path in caches.items()
    }
    assert per_token["plain"] < per_token["topk"] < 2 * per_token["plain"]


def test_inspect_and_validate_deep(caches: dict[str, Path]) -> None:
    shown = kdcache("inspect", str(caches["only"])).stdout
    assert "k=0 of V=" in shown and "samples 16 (samples only)" in shown
    shown = kdcache("inspect", str(caches["topk"])).stdout
    assert "schema 3.0" in shown and "(draws outside the top-k listed)" in shown
    for name in ("topk", "only"):
        assert "is valid (deep)" in kdcache("validate", "--deep", str(caches[name])).stdout


def test_train_reads_them_and_refuses_a_top_k_loss_without_a_top_k(
    caches: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    args = ["train", "--student", str(tiny_llama_dir), "--max-steps", "2", "--no-progress"]
    for cache, loss in (("topk", "fkl-hybrid"), ("topk", "rskd"), ("only", "rskd")):
        out = tmp_path / f"{cache}-{loss}"
        done = kdcache(*args, "--cache", str(caches[cache]), "--loss", loss, "--out", str(out))
        assert "trained 2 steps" in done.stdout
    refused = kdcache(
        *args,
        "--cache",
        str(caches["only"]),
        "--loss",
        "fkl",
        "--out",
        str(tmp_path / "x"),
        check=False,
    )
    line = one_line_error(refused)
    assert "stores samples only" in line and "--loss rskd" in line


def test_build_refuses_top_k_0_without_samples(tmp_path: Path) -> None:
    refused = kdcache("build", "--top-k", "0", "--out", str(tmp_path / "c"), check=False)
    assert "--top-k must be at least 1, or 0 with --samples N" in one_line_error(refused)
