"""The defaults at the sizes users run them: shards of several Zarr inner chunks, both formats,
every command in a fresh `kdcache` process.

A default build (`--shard-tokens` 1,048,576) of any dataset over 65,536 tokens once failed at
the first shard's finalize, and reading any Arrow cache failed outside pytest (no one imported
`pyarrow.compute`); tests with small shards and in-process commands saw neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import kdcache

pytestmark = pytest.mark.integration

TOKENS = 230_000
"""More than three Zarr inner chunks (65,536 tokens each) in one default-sized shard."""


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-tokenized documents of 300..6000 tokens (windowed at the default --max-length)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("big") / "docs.jsonl"
    total = 0
    with path.open("w") as f:
        while total < TOKENS:
            n = int(rng.integers(300, 6000))
            f.write(json.dumps({"input_ids": rng.integers(1, 384, n).tolist()}) + "\n")
            total += n
    return path


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_default_build_of_several_chunks_reads_validates_and_trains(
    tiny_llama_dir: Path, big_dataset: Path, tmp_path: Path, fmt: str
) -> None:
    cache = tmp_path / "cache"
    kdcache(
        "build", "--teacher", tiny_llama_dir, "--dataset", big_dataset, "--out", cache,
        "--format", fmt, "--no-progress",
    )  # fmt: skip
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["build"]["shard_tokens"] == 1 << 20
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 1
    assert manifest["shards"][0]["num_tokens"] >= TOKENS
    if fmt == "zarr":
        import zarr

        ids = zarr.open_group(cache / "shards" / "000000.zarr", mode="r")["input_ids"]
        assert ids.shape[0] // ids.chunks[0] >= 3, "the shard must span several inner chunks"

    info = json.loads(kdcache("inspect", cache, "--json").stdout)
    assert info["tokens"] == manifest["shards"][0]["num_tokens"]
    assert "ok:" in kdcache("validate", cache, "--deep").stdout
    trained = kdcache(
        "train", "--cache", cache, "--out", tmp_path / "run", "--max-steps", "2",
        "--batch-tokens", "4096", "--no-progress",
    )  # fmt: skip
    assert "trained 2 steps" in trained.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert np.isfinite(result["final_loss"])
