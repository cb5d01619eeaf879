"""Both backends pass the one conformance suite, and agree with each other bit for bit."""

import pytest
from hypothesis import HealthCheck, given, settings

from schemas.cache import BACKENDS
from schemas.encodings import default_encoding
from schemas.record import Layout
from schemas.storage import resolve
from schemas.testing import ShardBackendTests, layouts_and_lengths, random_records


class TestArrowBackend(ShardBackendTests):
    format = "arrow"


class TestZarrBackend(ShardBackendTests):
    format = "zarr"


class TestArrowBackendDefaultEncoding(ShardBackendTests):
    """The lossy default encoding: readers hand back exactly the decoded stored values."""

    format = "arrow"
    encoding = default_encoding(70_000)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=layouts_and_lengths())
def test_backends_return_identical_records(tmp_path_factory: pytest.TempPathFactory, case) -> None:
    layout, lengths, seed = case
    records = random_records(layout, lengths, seed)
    enc = default_encoding(layout.vocab_size)
    got = []
    for name, backend in BACKENDS.items():
        fs, root = resolve(str(tmp_path_factory.mktemp(name)))
        with backend.writer(fs, root, 0, layout, enc, {"cache_fingerprint": "x"}) as w:
            w.write(records)
            info = w.finalize()
        got.append(backend.reader(fs, root, info, layout, enc).read())
    assert got[0].equals(got[1])


def test_arrow_shard_reads_with_plain_pyarrow(tmp_path) -> None:
    import pyarrow as pa

    layout = Layout(k=4, vocab_size=100)
    records = random_records(layout, [3, 5], seed=0)
    fs, root = resolve(str(tmp_path))
    enc = default_encoding(100)
    with BACKENDS["arrow"].writer(fs, root, 0, layout, enc, {"cache_fingerprint": "x"}) as w:
        w.write(records)
        info = w.finalize()
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / info.name))).read_all()
    assert table.num_rows == 2
    assert table.column("input_ids").to_pylist()[1] == records.input_ids[3:].tolist()
    assert b"kdcache" in table.schema.metadata
