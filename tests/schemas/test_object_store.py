"""Caches on object storage: written and read through s3fs against a real S3-compatible server
(moto on 127.0.0.1), and through fsspec's memory filesystem."""

import pytest

from schemas.cache import open_cache
from schemas.validate import validate_cache
from tests.schemas.test_cache import make_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bucket(s3_options) -> str:
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("kdcache-schemas")
    return "kdcache-schemas"


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_cache_round_trips_on_s3(s3_options, bucket, tmp_path, fmt) -> None:
    import s3fs

    url = f"s3://kdcache-schemas/{fmt}"
    fs = s3fs.S3FileSystem(**s3_options)
    local = make_cache(str(tmp_path / "local"), fmt)
    from schemas.cache import CacheWriter
    from schemas.testing import random_records
    from tests.schemas.test_cache import draft

    writer = CacheWriter(url, draft(fmt), **s3_options)
    for i in range(3):
        with writer.shard_writer(i) as w:
            w.write(random_records(writer.draft.layout, [5, 7], seed=i))
            writer.commit_shard(w)
    remote = writer.finalize(3)
    assert [s.checksum for s in remote.shards] == [s.checksum for s in local.shards]
    cache = open_cache(url, **s3_options)
    assert all(
        cache.read_shard(i).equals(open_cache(str(tmp_path / "local")).read_shard(i))
        for i in range(3)
    )
    assert validate_cache(url, deep=True, **s3_options) == []
    assert not [p for p in fs.find(f"kdcache-schemas/{fmt}") if "/.tmp-" in p]


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_cache_round_trips_in_memory(tmp_path, fmt) -> None:
    make_cache(f"memory://kdcache-mem-{fmt}", fmt)
    assert validate_cache(f"memory://kdcache-mem-{fmt}", deep=True) == []
