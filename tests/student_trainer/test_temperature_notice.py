"""`kdcache train` at a temperature the cache stored no log-sum-exp for: told once at start,
naming the build option that makes it exact; `--strict-temperature` refuses instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_builder import build
from tests.fixtures.caches import pydoc_jsonl, small_build_config
from tests.fixtures.cli import kdcache, one_line_error

NOTICE = "approximate"


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("temperature")
    data = pydoc_jsonl(root / "docs.jsonl", 3, 800)
    out = {"plain": root / "plain", "stored": root / "stored"}
    build(small_build_config(tiny_llama_dir, data, out["plain"]))
    build(small_build_config(tiny_llama_dir, data, out["stored"], temperatures=(2.0,)))
    return out


def train(cache: Path, tmp_path: Path, tiny_llama_dir: Path, *extra: str, check: bool = True):
    args = ["train", "--cache", str(cache), "--student", str(tiny_llama_dir), "--max-steps", "1"]
    return kdcache(*args, "--out", str(tmp_path / "run"), "--no-progress", *extra, check=check)


def test_unstored_temperature_is_told_once(caches, tmp_path, tiny_llama_dir):
    done = train(caches["plain"], tmp_path, tiny_llama_dir, "--loss", "rkl", "--temperature", "2")
    told = [line for line in done.stderr.splitlines() if NOTICE in line]
    assert len(told) == 1, done.stderr
    assert "kdcache build --temperatures 2" in told[0] and "--strict-temperature" in told[0]


def test_strict_temperature_refuses(caches, tmp_path, tiny_llama_dir):
    args = ["--loss", "rkl", "--loss-option", "temperature=2", "--strict-temperature"]
    line = one_line_error(train(caches["plain"], tmp_path, tiny_llama_dir, *args, check=False))
    assert "temperature 2" in line and "kdcache build --temperatures 2" in line


@pytest.mark.parametrize(
    ("cache", "loss"), [("stored", "rkl"), ("plain", "fkl"), ("plain", "fkl-tail")]
)
def test_exact_cases_say_nothing(caches, tmp_path, tiny_llama_dir, cache, loss):
    temperature = "1" if loss == "fkl-tail" else "2"  # fkl is exact at any T
    done = train(
        caches[cache], tmp_path, tiny_llama_dir, "--loss", loss, "--temperature", temperature
    )
    assert NOTICE not in done.stderr
