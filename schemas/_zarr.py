"""Zarr v3 shards: one group per shard, one sharded array per stored column.

Each array is chunked along the token axis and packed into a single Zarr shard object, so a
cache shard is a handful of objects on an object store, read by byte ranges. Columns are
compressed with Blosc(zstd) using the shuffle each column declares. The cache identity sits in
the group attributes under "kdcache".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from fsspec import AbstractFileSystem
from zarr.codecs import BloscCodec

from schemas import _columns
from schemas._columns import StoredShard, concat_stored, to_stored
from schemas.backend import IDENTITY_KEY, ShardReader, ShardWriter
from schemas.record import empty_records
from schemas.storage import check_tree_size, checksum_tree, is_local

SUFFIX = ".zarr"
CHUNK_TOKENS = 1 << 16
"""Inner chunk length along the token axis: the unit of random access inside a shard."""


def _store(fs: AbstractFileSystem, path: str, read_only: bool) -> zarr.abc.store.Store:
    if is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    # Zarr drives the store from its own event loop, so it needs a filesystem made for that:
    # sync ones are wrapped, async ones (s3fs, gcsfs) re-created with asynchronous=True.
    if not getattr(fs, "async_impl", False):
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs, asynchronous=True)
    elif not fs.asynchronous:
        fs = type(fs)(**{**fs.storage_options, "asynchronous": True})
    return zarr.storage.FsspecStore(fs, path=path, read_only=read_only)


def _array(group: zarr.Group, name: str, values: np.ndarray, shuffle: str) -> None:
    n = values.shape[0]
    chunk = max(1, min(CHUNK_TOKENS, n))
    # Zarr needs the shard to be a whole number of inner chunks; the last chunk of the array
    # may be partial (zarr stores only what lies inside the array's shape).
    shard = -(-n // chunk) * chunk if n else chunk
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=(chunk, *values.shape[1:]),
        shards=(shard, *values.shape[1:]),
        compressors=BloscCodec(cname="zstd", clevel=5, shuffle=shuffle),
        # Store every chunk even when it equals the fill value: -0.0 == 0.0 would otherwise
        # come back as +0.0 and break the bit-for-bit round trip.
        config={"write_empty_chunks": True},
    )
    if values.size:
        arr[...] = values


class ZarrShardWriter(ShardWriter):
    """Buffers whole sequences in memory and writes the group once, at finalize."""

    suffix = SUFFIX

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: list[StoredShard] = []

    def _write(self, stored: StoredShard) -> None:
        self._parts.append(stored)

    def _close(self) -> None:
        parts, self._parts = self._parts, []
        stored = (
            concat_stored(parts)
            if parts
            else to_stored(empty_records(self.layout), self.layout, self.encoding)
        )
        group = zarr.open_group(_store(self.fs, self.tmp_path, False), mode="w", zarr_format=3)
        group.attrs[IDENTITY_KEY] = self.identity
        for name, col in _columns.token_columns(self.layout, self.encoding).items():
            _array(group, name, stored.tokens[name], col.shuffle)
        for name, values in stored.sequences.items():
            _array(group, name, values, "noshuffle")
        _array(group, "seq_offsets", stored.seq_offsets, "noshuffle")

    def _checksum(self, path: str) -> tuple[str, int]:
        return checksum_tree(self.fs, path)


class ZarrShardReader(ShardReader):
    def _group(self) -> zarr.Group:
        # zarr's LocalStore opens files by name, following links: first make sure the group
        # holds no link or special file and only the bytes the manifest declares.
        check_tree_size(self.fs, self.path, self.info.nbytes, root=self.root)
        try:
            return zarr.open_group(_store(self.fs, self.path, True), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises several unrelated types for a damaged group
            raise self._corrupt(exc) from exc

    def identity(self) -> dict[str, Any]:
        found = self._group().attrs.get(IDENTITY_KEY, {})
        return dict(found) if isinstance(found, dict) else {}

    def _read_stored(self, start: int | None, stop: int | None) -> StoredShard:
        """Reads only the chunks that hold sequences start..stop."""
        group = self._group()
        if start is None:
            offsets = group["seq_offsets"][...]
            start, stop = 0, offsets.shape[0] - 1
        else:
            offsets = group["seq_offsets"][start : stop + 1]
        lo, hi = int(offsets[0]), int(offsets[-1])
        names = _columns.token_columns(self.layout, self.encoding)
        return StoredShard(
            tokens={name: group[name][lo:hi] for name in names},
            sequences={
                name: group[name][start:stop] for name in _columns.sequence_columns(self.layout)
            },
            seq_offsets=np.asarray(offsets - lo, dtype=np.int64),
        )

    def _checksum(self, path: str) -> tuple[str, int]:
        return checksum_tree(self.fs, path, root=self.root, declared=self.info.nbytes)

    def missing_chunks(self) -> list[str]:
        """One line per array with fewer chunks stored than its shape needs.

        Zarr reads an unstored chunk as the fill value (zeros), so a chunk lost in a copy, with
        the manifest's checksum edited to match, decodes without an error; `validate --deep`
        asks this.
        """
        try:
            arrays = sorted(self._group().arrays())
            counts = [(name, arr.nchunks_initialized, arr.nchunks) for name, arr in arrays]
        except Exception as exc:  # zarr raises several unrelated types for a damaged group
            raise self._corrupt(exc) from exc
        return [
            f"{name}: {stored} of {expected} chunks stored (the rest read back as zeros)"
            for name, stored, expected in counts
            if stored < expected
        ]
