"""Reading a cache without kdcache: every block of FORMAT.md's "Reading a cache without
kdcache" runs, as written there, in a fresh interpreter where kdcache's packages and torch
cannot be imported, on caches the library builds; its answers must be kdcache's.

Also checked: the claims FORMAT.md makes about what does not work (DuckDB opening an IPC file,
`datasets.Dataset.from_file` on a shard), so the page changes when the libraries do.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from schemas.cache import open_cache
from schemas.encodings import default_encoding
from schemas.record import Layout, ShardRecords, concat_records
from tests.fixtures.isolated import RESULT, example, result, run_isolated
from tests.schemas.test_format_spec import build_cache

pytestmark = pytest.mark.integration

LAYOUT = Layout(k=5, vocab_size=300, temperatures=(2.0,), num_samples=4, content_keys=True)
CACHE_LITERAL = 'Path("my-cache")'


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An Arrow and a Zarr cache in the default encoding, two shards of two batches each."""
    encoding = default_encoding(LAYOUT.vocab_size)
    return {
        fmt: build_cache(tmp_path_factory.mktemp(fmt), fmt, LAYOUT, encoding, seed=3)
        for fmt in ("arrow", "zarr")
    }


def _records(root: Path) -> list[ShardRecords]:
    cache = open_cache(str(root))
    return [cache.read_shard(i) for i in range(len(cache.shards))]


def _run(name: str, root: Path, answer: str, tmp_path: Path) -> object:
    """Run FORMAT.md's setup block and block `name` on the cache at `root`, then print the
    JSON of the expression `answer` (names the block defines)."""
    setup = example("setup")
    assert setup.count(CACHE_LITERAL) == 1, "the setup block names its cache differently"
    code = "\n".join(
        [
            setup.replace(CACHE_LITERAL, f"Path({str(root)!r})"),
            example(name),
            f"import json as _json\nprint({RESULT!r} + _json.dumps({answer}))",
        ]
    )
    return result(run_isolated(code, tmp_path, env={"HF_DATASETS_CACHE": str(tmp_path / "hf")}))


def _top1_counts(records: list[ShardRecords]) -> collections.Counter[int]:
    return collections.Counter(int(i) for r in records for i in r.topk_ids[:, 0])


def test_pyarrow(caches: dict[str, Path], tmp_path: Path) -> None:
    records = _records(caches["arrow"])
    found = _run("pyarrow", caches["arrow"], "[table.num_rows, tokens.to_pylist()]", tmp_path)
    lengths = [int(n) for r in records for n in np.diff(r.seq_offsets)]
    assert found == [sum(r.num_sequences for r in records), lengths]


def test_pandas(caches: dict[str, Path], tmp_path: Path) -> None:
    records = _records(caches["arrow"])
    answer = '[df["tokens"].tolist(), {str(k): int(v) for k, v in top1.value_counts().items()}]'
    tokens, top1 = _run("pandas", caches["arrow"], answer, tmp_path)
    assert tokens == [int(n) for r in records for n in np.diff(r.seq_offsets)]
    assert top1 == {str(k): v for k, v in _top1_counts(records).items()}


def test_polars(caches: dict[str, Path], tmp_path: Path) -> None:
    records = _records(caches["arrow"])
    answer = (
        '[per_sequence["source_row"].to_list(), per_sequence["tokens"].to_list(), '
        "[list(row) for row in top1.iter_rows()]]"
    )
    rows, tokens, top1 = _run("polars", caches["arrow"], answer, tmp_path)
    assert rows == [int(x) for r in records for x in r.source_row]
    assert tokens == [int(n) for r in records for n in np.diff(r.seq_offsets)]
    assert {k: v for k, v in top1} == _top1_counts(records)


def test_duckdb(caches: dict[str, Path], tmp_path: Path) -> None:
    records = _records(caches["arrow"])
    tokens, top1, p_top1 = _run("duckdb", caches["arrow"], "[tokens, top1, p_top1]", tmp_path)
    want = sorted(
        [int(row), int(n)]
        for r in records
        for row, n in zip(r.source_row, np.diff(r.seq_offsets), strict=True)
    )
    assert sorted(tokens) == want
    counts = sorted(_top1_counts(records).items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert top1 == [list(kv) for kv in counts]
    exact = np.exp(concat_records(records).topk_logprobs[:, 0].astype(np.float64)).mean()
    assert p_top1 == pytest.approx(exact, rel=1e-12)


def test_datasets(caches: dict[str, Path], tmp_path: Path) -> None:
    first = _records(caches["arrow"])[0]
    answer = (
        '[len(ds), len(ds_cached), ds[0]["input_ids"], '
        'ds_cached.with_format("numpy")[0]["topk_ids"].tolist()]'
    )
    rows, cached_rows, input_ids, topk = _run("datasets", caches["arrow"], answer, tmp_path)
    total = sum(r.num_sequences for r in _records(caches["arrow"]))
    assert rows == cached_rows == total
    end = int(first.seq_offsets[1])
    assert input_ids == first.input_ids[:end].tolist()
    assert topk == first.topk_ids[:end].tolist()


def test_zarr(caches: dict[str, Path], tmp_path: Path) -> None:
    first = _records(caches["zarr"])[0]
    ids, encoding = _run(
        "zarr", caches["zarr"], "[ids.tolist(), group.attrs['kdcache']['encoding']]", tmp_path
    )
    lo, hi = first.seq_offsets[1], first.seq_offsets[2]
    assert ids == first.topk_ids[lo:hi].tolist()
    assert encoding == default_encoding(LAYOUT.vocab_size).describe()


def test_what_format_md_says_does_not_work(caches: dict[str, Path]) -> None:
    """DuckDB does not open an Arrow IPC file by itself, and `Dataset.from_file` wants the
    stream format: when a library learns either, FORMAT.md should say so."""
    import datasets
    import duckdb
    import pyarrow as pa

    shard = str(caches["arrow"] / open_cache(str(caches["arrow"])).shards[0].name)
    with pytest.raises(duckdb.Error):
        duckdb.sql(f"SELECT count(*) FROM '{shard}'").fetchall()
    with pytest.raises(pa.ArrowInvalid):
        datasets.Dataset.from_file(shard)


def test_the_readme_reads_a_cache_with_pandas_and_duckdb(
    caches: dict[str, Path], tmp_path: Path
) -> None:
    """README.md's "Sharing a cache" program, run as written (without kdcache or torch)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    code = example("readme-sharing", readme)
    assert code.count('Path("web-k64")') == 1, "the README names its cache differently"
    code = code.replace('Path("web-k64")', f"Path({str(caches['arrow'])!r})")
    answer = "[len(df), int(df['input_ids'].map(len).sum()), top5]"
    code += f"import json as _json\nprint({RESULT!r} + _json.dumps({answer}))\n"
    sequences, tokens, top5 = result(run_isolated(code, tmp_path))
    records = _records(caches["arrow"])
    assert sequences == sum(r.num_sequences for r in records)
    assert tokens == sum(r.num_tokens for r in records)
    counts = sorted(_top1_counts(records).items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert top5 == [list(kv) for kv in counts]
