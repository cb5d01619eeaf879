"""Caches written by an older format version stay readable, and say what they lack.

`tests/fixtures/data/cache-1.0-*` were written by kdcache's format 1.0 (k=4 of V=384, 3
samples, T=2): no content keys, no layout in the shards' own metadata, no fidelity block, no
tokenizer checksums.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from schemas import open_cache
from schemas.validate import validate_cache
from tests.fixtures.cli import kdcache
from tests.fixtures.models import tiny_student_config

OLD = Path(__file__).parents[1] / "fixtures" / "data"


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_a_format_1_cache_reads_and_validates(fmt: str) -> None:
    cache = open_cache(str(OLD / f"cache-1.0-{fmt}"))
    assert cache.manifest.schema_version == "1.0" and not cache.layout.content_keys
    assert cache.manifest.fidelity is None and cache.manifest.tokenizer.files == ()
    records = [cache.read_shard(i) for i in range(len(cache.shards))]
    assert sum(r.num_tokens for r in records) == cache.manifest.num_tokens == 662
    assert all(r.document_hash is None and r.sample_ids is not None for r in records)
    assert validate_cache(cache.url, deep=True) == []
    with cache.tokenizer_files() as folder:
        assert (Path(folder) / "tokenizer.json").is_file()


def test_a_format_1_cache_trains_from_the_command_line(tmp_path: Path) -> None:
    cache = tmp_path / "old"
    shutil.copytree(OLD / "cache-1.0-zarr", cache)
    student = tiny_student_config(tmp_path)
    kdcache("validate", cache, "--deep")
    info = json.loads(kdcache("inspect", cache, "--json").stdout)
    assert info["fidelity"] is None and info["teacher_stats"]["sampled_tokens"] == 662
    run = kdcache(
        "train", "--cache", cache, "--out", tmp_path / "run", "--student-config",
        student, "--loss", "rskd", "--max-steps", "2", "--batch-tokens", "256",
        "--no-progress",
    )  # fmt: skip
    assert "trained 2 steps" in run.stdout
