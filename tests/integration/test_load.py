"""Load: a large cache streams through the training data path with flat memory, and a manifest
of 10,000 shards opens in under a second.

The cache is synthetic records through the real writer (`bench.load`: k=8, V=512, the
builder's invariants, both formats), written once per session: 1M tokens in `make test`, 10M in
`make test-long`. Memory is the tracemalloc peak (numpy's arrays are traced) while
`ShardStream` -> `batches` -> `collate` runs over the whole cache: after the last shard it is
within one decoded shard of what it was after a quarter of them. Speed and RSS are figures,
not assertions: `python -m bench.load` prints them (bench/results/load.json).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import (
    SHARD_TOKENS,
    decoded_shard_bytes,
    open_seconds,
    stream,
    write_big_manifest,
    write_cache,
)
from schemas.cache import open_cache
from tests.fixtures.cli import kdcache

pytestmark = [pytest.mark.integration, pytest.mark.reliability("load")]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("arrow", 1_000_000, 1 << 15), id="arrow-1M"),
        pytest.param(("zarr", 1_000_000, 1 << 15), id="zarr-1M"),
        pytest.param(("arrow", 10_000_000, SHARD_TOKENS), id="arrow-10M", marks=pytest.mark.long),
        pytest.param(("zarr", 10_000_000, SHARD_TOKENS), id="zarr-10M", marks=pytest.mark.long),
    ],
)
def large_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """(format, tokens, tokens a shard): a complete cache of that size, written once."""
    fmt, tokens, shard_tokens = request.param
    url = str(tmp_path_factory.mktemp(f"load-{fmt}-{tokens}") / "cache")
    manifest = write_cache(url, tokens, fmt, shard_tokens=shard_tokens)
    assert manifest.num_tokens >= tokens and len(manifest.shards) >= 30
    return url


def test_memory_stays_flat_while_a_large_cache_streams(large_cache: str) -> None:
    cache = open_cache(large_cache)
    one_shard = decoded_shard_bytes(large_cache)
    result = stream(large_cache)
    assert result["tokens"] == cache.manifest.num_tokens, "the stream did not read the whole cache"
    early, end = result["traced_peak_quarter_bytes"], result["traced_peak_end_bytes"]
    assert early > one_shard, "the trace does not see the shards being decoded"
    assert end - early < one_shard, (
        f"the traced peak grew {(end - early) / 2**20:.1f} MiB between a quarter and all "
        f"{len(cache.shards)} shards (one decoded shard: {one_shard / 2**20:.1f} MiB): memory "
        "grows with the cache"
    )


def test_validate_deep_accepts_the_synthetic_records(tmp_path: Path) -> None:
    """The load cache holds what a build writes: every deep check passes on it."""
    url = str(tmp_path / "cache")
    write_cache(url, 40_000, "arrow", shard_tokens=1 << 13)
    kdcache("validate", url, "--deep")


def test_a_manifest_of_10000_shards_opens_in_under_a_second(tmp_path: Path) -> None:
    folder = write_big_manifest(tmp_path / "many", 10_000)
    seconds = open_seconds(str(folder))
    assert seconds < 1.0, f"open_cache took {seconds:.2f} s on a manifest of 10,000 shards"
    shown = kdcache("inspect", folder).stdout  # from the manifest alone: no shard is read
    assert "10000 shards" in shown.replace(",", "")
