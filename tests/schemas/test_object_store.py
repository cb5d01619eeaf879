"""Caches on object storage: written and read through s3fs against a real S3-compatible server
(moto on 127.0.0.1), and through fsspec's memory filesystem."""

import logging

import pytest

from schemas.cache import open_cache
from schemas.validate import validate_cache
from tests.schemas.test_cache import make_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_options():
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        "key": "x",
        "secret": "x",
    }
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("kdcache-schemas")
    try:
        yield options
    finally:
        server.stop()


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_cache_round_trips_on_s3(s3_options, tmp_path, fmt) -> None:
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
            writer.commit(w.finalize())
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
