"""One writer and one reader interface for shards, whatever the storage format.

A shard holds whole sequences. Writers are context managers with a commit:

    with backend.writer(fs, root, index, layout, encoding, identity) as w:
        w.write(records)          # any number of times (or w.write_stored(stored))
        info = w.seal()           # closes and checksums, still in staging/ -> ShardInfo

Until it is published, everything lives under `staging/` at the cache root, where no reader
and no glob over `shards/` looks; an exception inside the `with` removes it. In a cache,
`CacheWriter.commit_shard` seals, writes the commit record, then publishes (moves the shard
into `shards/`): so `shards/` only ever holds committed shards (see `schemas.writer`).
`finalize` seals and publishes at once, for a shard written on its own.

Both backends store the same encoded columns (`schemas._columns`), so the records they hand
back are equal bit for bit. Every shard also carries its own metadata (`IDENTITY_KEY`): the
format version, the fingerprint of the cache it was written for, its index, the layout and the
encoding with its parameters, so a shard found on its own can still be identified and decoded.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from fsspec import AbstractFileSystem

from schemas._columns import StoredShard, from_stored, to_stored
from schemas._durable import sync_folder
from schemas._retry import transient
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError, KdcacheError
from schemas.fidelity import ShardFidelity, measure
from schemas.manifest import SHARD_DIR, ShardInfo
from schemas.record import Layout, ShardRecords
from schemas.storage import is_local, join, move_tree
from schemas.version import version_for

IDENTITY_KEY = "kdcache"
"""Key of the metadata every shard carries (Arrow schema metadata, Zarr group attributes)."""
STAGING_DIR = "staging"
"""Where shards are written before they are moved into `shards/` and committed."""


def shard_name(index: int, suffix: str) -> str:
    return f"{SHARD_DIR}/{index:06d}{suffix}"


def shard_metadata(layout: Layout, encoding: TopkEncoding) -> dict[str, Any]:
    """What a shard says about its own contents (JSON-ready)."""
    return {
        "format_version": version_for(layout.compact_samples),
        "layout": json.loads(json.dumps(layout.to_json())),
        "encoding": encoding.describe(),
    }


class ShardWriter(ABC):
    suffix: ClassVar[str]

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        index: int,
        layout: Layout,
        encoding: TopkEncoding,
        identity: dict[str, Any],
    ) -> None:
        self.fs, self.root, self.index = fs, root, index
        self.layout, self.encoding = layout, encoding
        self.identity = {**identity, **shard_metadata(layout, encoding), "shard_index": index}
        self.name = shard_name(index, self.suffix)
        # Every store writes under staging/ and moves the finished shard into shards/: a local
        # rename is atomic, an object store copies on its own side. Until then a glob over
        # shards/ never sees it.
        staging = join(root, STAGING_DIR)
        self.tmp_path = join(staging, f"{index:06d}-{uuid.uuid4().hex[:8]}{self.suffix}")
        self.num_tokens = 0
        self.num_sequences = 0
        self.fidelity: ShardFidelity | None = ShardFidelity()
        """Measured by `write`; None once `write_stored` (values no longer exact) is used."""
        self._done = False
        fs.makedirs(staging, exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()

    def write(self, records: ShardRecords) -> None:
        """Append whole sequences, measuring their fidelity before they are encoded."""
        records.check(self.layout)
        if self.fidelity is not None:
            self.fidelity = self.fidelity + measure(records, self.encoding, self.layout.vocab_size)
        self._append(to_stored(records, self.layout, self.encoding))

    def write_stored(self, stored: StoredShard) -> None:
        """Append whole sequences already in their stored form (copied from another shard)."""
        stored.check(self.layout, self.encoding)
        self.fidelity = None
        self._append(stored)

    def _append(self, stored: StoredShard) -> None:
        self._write(stored)
        self.num_tokens += stored.num_tokens
        self.num_sequences += stored.num_sequences

    def seal(self) -> ShardInfo:
        """Close and checksum the staged shard; return what to list. It stays in `staging/`
        (at `tmp_path`) until `publish_shard` moves it: `CacheWriter.commit_shard` writes the
        commit record in between, so no shard sits in `shards/` without one."""
        self._close()
        checksum, nbytes = self._checksum(self.tmp_path)
        self._done = True
        return ShardInfo(
            name=self.name,
            index=self.index,
            num_tokens=self.num_tokens,
            num_sequences=self.num_sequences,
            nbytes=nbytes,
            checksum=checksum,
            fidelity=self.fidelity,
        )

    def finalize(self) -> ShardInfo:
        """Seal the shard and move it into `shards/` at once (a shard outside a cache)."""
        info = self.seal()
        publish_shard(self.fs, self.root, self.tmp_path, info.name)
        return info

    def abort(self) -> None:
        self._done = True
        self._discard()
        if self.fs.exists(self.tmp_path):
            self.fs.rm(self.tmp_path, recursive=True)

    def identity_json(self) -> str:
        return json.dumps(self.identity, sort_keys=True)

    @abstractmethod
    def _write(self, stored: StoredShard) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _discard(self) -> None:  # noqa: B027 - optional hook, most backends hold no handle
        """Drop open handles before an abort removes the temporary files."""

    @abstractmethod
    def _checksum(self, path: str) -> tuple[str, int]: ...


def publish_shard(fs: AbstractFileSystem, root: str, staged: str, name: str) -> None:
    """Move a sealed shard from `staged` to its name in `shards/`, replacing a leftover there."""
    final = join(root, name)
    if fs.exists(final):  # a move a killed run began (the record says it is committed)
        fs.rm(final, recursive=True)
    fs.makedirs(join(root, SHARD_DIR), exist_ok=True)
    move_tree(fs, staged, final)
    if is_local(fs):  # the move on the disk before a manifest may list the shard
        sync_folder(join(root, SHARD_DIR))


class ShardReader(ABC):
    """Reads one committed shard; `verify` checks its size and checksum against the manifest."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        info: ShardInfo,
        layout: Layout,
        encoding: TopkEncoding,
        *,
        verify: bool = True,
    ) -> None:
        self.fs, self.root, self.info = fs, root, info
        self.layout, self.encoding = layout, encoding
        self.path = join(root, info.name)
        self.where = f"shard {info.name} of {root}"
        if not fs.exists(self.path):
            raise CacheNotFoundError(
                f"{self.where} is listed in the manifest but missing",
                hint="restore it from a copy, or rebuild: kdcache build resumes and rewrites missing shards",
            )
        if verify:
            self.verify()

    def verify(self) -> None:
        checksum, nbytes = self._checksum(self.path)
        if nbytes != self.info.nbytes:
            raise CacheCorruptError(
                f"{self.where} has {nbytes} bytes, the manifest says {self.info.nbytes} (truncated or replaced)",
                hint="delete the shard and re-run the build to rewrite it",
            )
        if checksum != self.info.checksum:
            raise CacheCorruptError(
                f"{self.where} fails its checksum (its bytes changed after it was written)",
                hint="delete the shard and re-run the build to rewrite it",
            )

    def read(self) -> ShardRecords:
        """All records of the shard."""
        return self._decode(self.read_stored())

    def read_sequences(self, start: int, stop: int) -> ShardRecords:
        """Sequences start..stop (exclusive)."""
        return self._decode(self.read_stored(start, stop))

    def read_stored(self, start: int | None = None, stop: int | None = None) -> StoredShard:
        """Sequences start..stop (all by default) in their stored form, checked against the
        layout (column names, dtypes, shapes, offsets)."""
        try:
            stored = self._read_stored(start, stop)
            stored.check(self.layout, self.encoding)
        except KdcacheError:  # a StorageError after retries: the store failed, not the shard
            raise
        except Exception as exc:  # codec, key, shape and offset errors all mean a damaged shard
            if transient(exc):  # a store failing inside zarr's reads: `Cache` names the URL
                raise
            raise self._corrupt(exc) from exc
        return stored

    def check_identity(self, expected: dict[str, Any]) -> None:
        """Raise `CacheCorruptError` unless the shard's own metadata has `expected`'s values."""
        found = self.identity()
        for key, want in expected.items():
            if found.get(key) != want:
                raise CacheCorruptError(
                    f"{self.where} does not belong here: its metadata says {key} "
                    f"{_brief(found.get(key))}, the manifest {_brief(want)}",
                    hint="the shard was copied in from another cache or the manifest was edited; "
                    "restore both from the cache's producer",
                )

    def _decode(self, stored: StoredShard) -> ShardRecords:
        try:
            return from_stored(stored, self.layout, self.encoding)
        except Exception as exc:  # an encoding's own consistency checks (ValueError)
            raise self._corrupt(exc) from exc

    @abstractmethod
    def _read_stored(self, start: int | None, stop: int | None) -> StoredShard: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """The metadata written into the shard itself."""

    @abstractmethod
    def _checksum(self, path: str) -> tuple[str, int]: ...

    def _corrupt(self, exc: BaseException) -> CacheCorruptError:
        return CacheCorruptError(
            f"{self.where} cannot be decoded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            hint="run `kdcache validate --deep` on the cache; delete the shard and re-run the build",
        )


def _brief(value: object) -> str:
    try:
        text = json.dumps(value, sort_keys=True)
    except (RecursionError, ValueError):  # metadata nested deeper than this stack can print
        text = f"a {type(value).__name__} nested too deep to print"
    return text if len(text) <= 80 else text[:77] + "..."
