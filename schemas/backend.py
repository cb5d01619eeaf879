"""One writer and one reader interface for shards, whatever the storage format.

A shard holds whole sequences. Writers are context managers with a commit:

    with backend.writer(fs, root, index, layout, encoding, identity) as w:
        w.write(records)          # any number of times
        info = w.finalize()       # closes, checksums, moves into place -> ShardInfo

Until `finalize` returns, everything lives under a temporary name in `shards/` that no reader
looks at; an exception inside the `with` removes it. Listing the returned `ShardInfo` in the
manifest is what makes the shard part of the cache (see `schemas.cache`).

Both backends store the same encoded columns (`schemas._columns`), so the records they hand
back are equal bit for bit.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from fsspec import AbstractFileSystem

from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError
from schemas.manifest import SHARD_DIR, ShardInfo
from schemas.record import Layout, ShardRecords
from schemas.storage import is_local, join

IDENTITY_KEY = "kdcache"
"""Key of the identity metadata every shard carries (Arrow schema metadata, Zarr attributes)."""


def shard_name(index: int, suffix: str) -> str:
    return f"{SHARD_DIR}/{index:06d}{suffix}"


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
        self.identity = {**identity, "shard_index": index}
        self.name = shard_name(index, self.suffix)
        final = join(root, self.name)
        # Local disks write under a temporary name and rename (atomic). Object stores have no
        # rename (a "move" copies every object), so they write under the final name, clearing
        # an uncommitted leftover first; either way, only the commit makes a shard visible.
        self.direct = not is_local(fs)
        if self.direct and fs.exists(final):
            fs.rm(final, recursive=True)
        tmp = join(root, SHARD_DIR, f".tmp-{index:06d}-{uuid.uuid4().hex[:8]}{self.suffix}")
        self.tmp_path = final if self.direct else tmp
        self.num_tokens = 0
        self.num_sequences = 0
        self._done = False
        fs.makedirs(join(root, SHARD_DIR), exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()

    def write(self, records: ShardRecords) -> None:
        """Append whole sequences."""
        records.check(self.layout)
        self._write(records)
        self.num_tokens += records.num_tokens
        self.num_sequences += records.num_sequences

    def finalize(self) -> ShardInfo:
        """Close, checksum, and move the shard to its final name; return what to list."""
        self._close()
        checksum, nbytes = self._checksum(self.tmp_path)
        final = join(self.root, self.name)
        if not self.direct:
            if self.fs.exists(final):  # an uncommitted leftover of a crashed run: never listed
                self.fs.rm(final, recursive=True)
            self.fs.mv(self.tmp_path, final, recursive=True)
        self._done = True
        return ShardInfo(
            name=self.name,
            index=self.index,
            num_tokens=self.num_tokens,
            num_sequences=self.num_sequences,
            nbytes=nbytes,
            checksum=checksum,
        )

    def abort(self) -> None:
        self._done = True
        self._discard()
        if self.fs.exists(self.tmp_path):
            self.fs.rm(self.tmp_path, recursive=True)

    def identity_json(self) -> str:
        return json.dumps(self.identity, sort_keys=True)

    @abstractmethod
    def _write(self, records: ShardRecords) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _discard(self) -> None:  # noqa: B027 - optional hook, most backends hold no handle
        """Drop open handles before an abort removes the temporary files."""

    @abstractmethod
    def _checksum(self, path: str) -> tuple[str, int]: ...


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

    @abstractmethod
    def read(self) -> ShardRecords:
        """All records of the shard."""

    def read_sequences(self, start: int, stop: int) -> ShardRecords:
        """Sequences start..stop (exclusive)."""
        return self.read().sequences(start, stop)

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """The identity metadata written into the shard itself."""

    @abstractmethod
    def _checksum(self, path: str) -> tuple[str, int]: ...

    def _corrupt(self, exc: BaseException) -> CacheCorruptError:
        return CacheCorruptError(
            f"{self.where} cannot be decoded ({type(exc).__name__}: {exc})",
            hint="run `kdcache validate --deep` on the cache; delete the shard and re-run the build",
        )
