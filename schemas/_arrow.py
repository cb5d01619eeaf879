"""Arrow IPC shards: one file per shard, one row per sequence.

Per-sequence fields are plain columns; per-token fields are list columns (a fixed-size list per
token where the field has a k or samples axis), so `pyarrow`, pandas, Polars, DuckDB and
Hugging Face `datasets` read a shard directly, one row per sequence. Record batches are
compressed with zstd, and the cache identity sits in the schema metadata under "kdcache".
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc  # pyarrow does not load its compute module by itself

from schemas import _columns
from schemas._columns import StoredShard
from schemas.backend import IDENTITY_KEY, ShardReader, ShardWriter
from schemas.encodings import Column, TopkEncoding
from schemas.record import Layout
from schemas.storage import checksum_file, read_declared

SUFFIX = ".arrow"
_ZSTD_LEVEL = 3


def arrow_schema(layout: Layout, encoding: TopkEncoding, identity: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of a shard: derived from the record table and the encoding."""
    fields = [
        pa.field(name, pa.from_numpy_dtype(np.dtype(dt)))
        for name, dt in _columns.sequence_columns(layout).items()
    ]
    for col in _columns.token_columns(layout, encoding).values():
        fields.append(
            pa.field(col.name, pa.list_(_token_type(col)), metadata={"meaning": col.meaning})
        )
    return pa.schema(fields, metadata={IDENTITY_KEY: json.dumps(identity, sort_keys=True)})


def _token_type(col: Column) -> pa.DataType:
    item = pa.from_numpy_dtype(np.dtype(col.dtype))
    for size in reversed(col.shape):
        item = pa.list_(item, size)
    return item


class ArrowShardWriter(ShardWriter):
    suffix = SUFFIX

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema = arrow_schema(self.layout, self.encoding, self.identity)
        self._sink = self.fs.open(self.tmp_path, "wb")
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", _ZSTD_LEVEL))
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=options)

    def _write(self, stored: StoredShard) -> None:
        offsets = pa.array(stored.seq_offsets.astype(np.int32))
        arrays = []
        for field in self.schema:
            if field.name in stored.sequences:
                arrays.append(pa.array(stored.sequences[field.name]))
                continue
            values = stored.tokens[field.name]
            flat = pa.array(values.reshape(-1))
            for size in reversed(values.shape[1:]):
                flat = pa.FixedSizeListArray.from_arrays(flat, size)
            arrays.append(pa.ListArray.from_arrays(offsets, flat))
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def _close(self) -> None:
        self._writer.close()
        self._sink.close()

    def _discard(self) -> None:
        if not self._sink.closed:
            self._sink.close()

    def _checksum(self, path: str) -> tuple[str, int]:
        return checksum_file(self.fs, path)


class ArrowShardReader(ShardReader):
    def _open(self) -> pa.ipc.RecordBatchFileReader:
        try:
            # Memory-mapped when local (a regular file, no link), refused unless it has the
            # size the manifest declares: nothing past that is ever mapped or read.
            data = read_declared(self.fs, self.path, self.info.nbytes, root=self.root)
            return pa.ipc.open_file(pa.py_buffer(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._corrupt(exc) from exc

    def identity(self) -> dict[str, Any]:
        meta = self._open().schema.metadata or {}
        try:
            found = json.loads(meta.get(IDENTITY_KEY.encode(), b"{}"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise self._corrupt(exc) from exc
        return found if isinstance(found, dict) else {}

    def _read_stored(self, start: int | None, stop: int | None) -> StoredShard:
        table = self._open().read_all()
        if start is not None:
            table = table.slice(start, stop - start)
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cols = _columns.token_columns(self.layout, self.encoding)
        return StoredShard(
            tokens={name: _flatten(table.column(name), col) for name, col in cols.items()},
            sequences={
                name: table.column(name).to_numpy()
                for name in _columns.sequence_columns(self.layout)
            },
            seq_offsets=offsets,
        )

    def _checksum(self, path: str) -> tuple[str, int]:
        return checksum_file(self.fs, path, root=self.root, declared=self.info.nbytes)


def _flatten(column: pa.ChunkedArray, col: Column) -> np.ndarray:
    """(N, *shape) values of a list column in the column's stored dtype, whatever its chunking.

    Flattening a sliced list array yields only the slice's values."""
    pieces = []
    for chunk in column.chunks:
        flat = chunk.flatten()
        for _ in col.shape:
            flat = flat.flatten()
        pieces.append(flat.to_numpy(zero_copy_only=False))
    values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=col.dtype)
    if values.dtype != np.dtype(col.dtype):
        raise ValueError(f"{col.name} is stored as {values.dtype}, the layout says {col.dtype}")
    return values.reshape(-1, *col.shape)
