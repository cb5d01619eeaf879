"""A cache is untrusted input: `kdcache train` checks what it decodes before it uses it, and
`kdcache validate` names where each problem lies.

Real caches are built by the tiny teacher, then forged: bad records whose manifest entries are
rewritten to match (a checksum matches a bad shard as well as a good one), layouts edited in the
manifest, shard entries lost, doubled or renumbered. Every command runs as a user runs it: the
installed `kdcache` in a fresh process.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import open_cache
from schemas._columns import StoredShard
from tests.fixtures.cli import kdcache, one_line_error
from tests.fixtures.forge import forge_shard

pytestmark = [pytest.mark.integration, pytest.mark.reliability("tampered-cache")]

SMALL = ["--max-length", "64", "--top-k", "8", "--shard-tokens", "384", "--batch-tokens", "256"]
EXTRAS = {"arrow": ["--samples", "4", "--temperatures", "2"], "zarr": []}
"""The Arrow cache also holds samples and an extra temperature, so their checks meet real data."""


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-tokenized documents (used exactly as given)."""
    rng = np.random.default_rng(11)
    docs = [rng.integers(1, 384, int(n)).tolist() for n in rng.integers(20, 150, 20)]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def built(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, documents: Path, tmp_path_factory
) -> Path:
    fmt = request.param
    out = tmp_path_factory.mktemp(fmt) / "cache"
    kdcache("build", "--teacher", tiny_llama_dir, "--dataset", documents, "--out", out,
            "--format", fmt, *SMALL, *EXTRAS[fmt], "--no-progress")  # fmt: skip
    assert len(open_cache(str(out)).shards) >= 4
    return out


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built, tmp_path / "c")
    return tmp_path / "c"


def student_config(folder: Path) -> Path:
    config = {
        "model_type": "llama", "vocab_size": 384, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 128,
    }  # fmt: skip
    path = folder / "student.json"
    path.write_text(json.dumps(config))
    return path


def train(cache: Path, tmp_path: Path, *extra: str) -> Any:
    return kdcache("train", "--cache", cache, "--out", tmp_path / "run", "--student-config",
                   student_config(tmp_path), "--max-steps", "2", "--batch-tokens", "256",
                   "--no-progress", *extra, check=False)  # fmt: skip


def shard(cache: Path, index: int) -> str:
    return open_cache(str(cache)).shards[index].name


def tokens(cache: Path, index: int) -> int:
    return open_cache(str(cache)).shards[index].num_tokens


def edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))


# -- the faults -----------------------------------------------------------------------------


def nan_logprobs(stored: StoredShard) -> None:
    stored.tokens["topk_logprob_top1"][3] = np.nan  # q8c: the whole row decodes to NaN


def ids_outside_vocab(stored: StoredShard) -> None:
    stored.tokens["topk_ids"][5, 0] = 400  # stored uint16, vocabulary of 384


def broken_offsets(stored: StoredShard) -> None:
    stored.seq_offsets[1] = stored.seq_offsets[2] + 3  # sequence 1 ends before it starts


CONTENT = {
    "nan": (nan_logprobs, True, "topk_logprobs: 1 of {n} positions hold NaN or values > 0"),
    "ids": (ids_outside_vocab, True, "topk_ids: 1 of {n} positions hold ids outside the vocabulary [0, 384)"),
    "offsets": (broken_offsets, False, "cannot be decoded (ValueError: seq_offsets must rise"),
}  # fmt: skip


def plant(cache: Path, index: int, fault: str) -> str:
    """Plant `fault` in shard `index`; the problem text to expect for it."""
    edit, checked, expected = CONTENT[fault]
    forge_shard(cache, index, edit, checked=checked)
    return expected.format(n=tokens(cache, index))


def test_freshly_built_caches_pass_every_check(built: Path) -> None:
    """No false alarms on what the real builder writes (samples and temperatures included)."""
    assert "ok:" in kdcache("validate", built, "--deep").stdout


@pytest.mark.parametrize("fault", sorted(CONTENT))
def test_train_stops_naming_the_shard_with_bad_records(
    cache: Path, tmp_path: Path, fault: str
) -> None:
    expected = plant(cache, 1, fault)
    line = one_line_error(train(cache, tmp_path))
    assert shard(cache, 1) in line and expected in line, line
    assert "--skip-bad-shards" in line and "validate --deep" in line, line


@pytest.mark.parametrize("key,value", [("k", 6), ("vocab_size", 300)])
def test_a_layout_edited_in_the_manifest_stops_train_and_is_blamed_on_the_manifest(
    cache: Path, tmp_path: Path, key: str, value: int
) -> None:
    edit_manifest(cache, lambda m: m["layout"].update({key: value}))
    line = one_line_error(train(cache, tmp_path))
    assert "shards/0000" in line and "does not belong here" in line and "layout" in line, line
    problems = kdcache("validate", cache, "--deep", check=False)
    lines = problems.stderr.splitlines()
    assert problems.returncode == 1 and lines, problems.stderr
    assert all(x.startswith("error: manifest.json: ") for x in lines), problems.stderr
    assert any(f"{key}: {value} here" in x for x in lines), problems.stderr


@pytest.mark.parametrize("workers", ["0", "1"])
def test_skip_bad_shards_trains_on_the_good_ones_and_reports_the_skipped(
    cache: Path, tmp_path: Path, workers: str
) -> None:
    """Also when a DataLoader worker, whose own count dies with it, met the bad shard."""
    plant(cache, 1, "nan")
    run = train(cache, tmp_path, "--skip-bad-shards", "--num-workers", workers)
    assert run.returncode == 0, run.stderr
    assert "trained 2 steps" in run.stdout
    assert f"skipped 1 bad shards ({shard(cache, 1)})" in run.stdout
    assert f"skipping {shard(cache, 1)}: shard {shard(cache, 1)}" in run.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["bad_shards"] == [shard(cache, 1)]


def test_validate_deep_lists_each_problem(cache: Path) -> None:
    expected = {
        shard(cache, 1): plant(cache, 1, "nan"),
        shard(cache, 2): plant(cache, 2, "ids"),
        shard(cache, 3): plant(cache, 3, "offsets"),
    }
    run = kdcache("validate", cache, "--deep", check=False)
    lines = run.stderr.splitlines()
    assert run.returncode == 1 and len(lines) == 3, run.stderr
    for (name, what), line in zip(sorted(expected.items()), lines, strict=True):
        assert line.startswith(f"error: {name}: ") and what in line, line


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("lost", "its shards hold"),
        ("doubled", "more than once (one shard read twice)"),
        ("renumbered", "missing [1], unexpected [7]"),
    ],
)
def test_a_damaged_shard_list_is_reported_naming_the_manifest(
    cache: Path, damage: str, expected: str
) -> None:
    def edit(m: dict) -> None:
        if damage == "lost":
            del m["shards"][-1]
        elif damage == "doubled":
            m["shards"][2] = {**m["shards"][1], "index": 2}
        else:
            m["shards"][1]["index"] = 7

    edit_manifest(cache, edit)
    run = kdcache("validate", cache, check=False)
    assert run.returncode == 1
    assert any(
        line.startswith("error: manifest.json: ") and expected in line
        for line in run.stderr.splitlines()
    ), run.stderr
