"""A cache on disk or object storage, opened for reading: its manifest, its shards and its
tokenizer copy. Only the shards the manifest lists exist for a reader, so it never sees one a
writer has not committed (the commit protocol: `schemas.writer`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from schemas._arrow import ArrowShardReader, ArrowShardWriter
from schemas._jsonparse import decode_json
from schemas._zarr import ZarrShardReader, ZarrShardWriter
from schemas.backend import ShardReader, ShardWriter, shard_metadata
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError, IncompatibleCacheError
from schemas.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_TOKENIZER_FILE_BYTES,
    SHARD_DIR,
    FileInfo,
    Manifest,
    ShardInfo,
    parse_manifest,
)
from schemas.record import Layout, ShardRecords
from schemas.storage import (
    check_cache_tree,
    join,
    read_bounded,
    real_root,
    resolve,
    storage_errors,
)
from schemas.version import parse_version

MANIFEST = "manifest.json"
COMMITS = "commits"
TOKENIZER_DIR = "tokenizer"
"""A copy of the tokenizer files, so a student can be set up from the cache alone."""


@dataclass(frozen=True)
class Backend:
    writer: type[ShardWriter]
    reader: type[ShardReader]


BACKENDS: dict[str, Backend] = {
    "arrow": Backend(ArrowShardWriter, ArrowShardReader),
    "zarr": Backend(ZarrShardWriter, ZarrShardReader),
}


class Cache:
    """A cache opened for reading. Only the shards the manifest lists exist for it."""

    def __init__(self, url: str, fs: AbstractFileSystem, root: str, manifest: Manifest) -> None:
        self.url, self.fs, self.root, self.manifest = url, fs, root, manifest
        self.layout: Layout = manifest.layout
        try:
            self.encoding = TopkEncoding.from_json(manifest.encoding)
        except (ValueError, TypeError) as exc:  # parse_manifest refuses these; a hand-made one
            raise CacheCorruptError(
                f"{url}: the manifest's encoding cannot be used ({' '.join(str(exc).split())})",
                hint="upgrade kdcache if a newer one made the cache; otherwise restore the manifest",
            ) from None
        self.backend = BACKENDS[manifest.format]

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self.manifest.shards

    @property
    def complete(self) -> bool:
        return self.manifest.status == "complete"

    def reader(self, shard: ShardInfo | int, *, verify: bool = True) -> ShardReader:
        """A reader of a listed shard, whose own metadata is checked against the manifest
        (and, with `verify`, its size and checksum)."""
        info = self.shards[shard] if isinstance(shard, int) else shard
        with storage_errors(self.url, f"reading {info.name}"):
            reader = self.backend.reader(
                self.fs, self.root, info, self.layout, self.encoding, verify=verify
            )
            reader.check_identity(self.expected_identity(info))
        return reader

    def expected_identity(self, info: ShardInfo) -> dict[str, Any]:
        """What shard `info`'s own metadata must say to belong to this cache."""
        expected: dict[str, Any] = {
            "cache_fingerprint": info.origin or self.manifest.fingerprint,
            "shard_index": info.index if info.origin_index is None else info.origin_index,
        }
        if parse_version(self.manifest.schema_version)[0] >= 2:  # 1.x shards carry no layout
            meta = shard_metadata(self.layout, self.encoding)
            expected["layout"] = meta["layout"]
            expected["encoding"] = meta["encoding"]
        return expected

    def read_shard(self, shard: ShardInfo | int, *, verify: bool = True) -> ShardRecords:
        reader = self.reader(shard, verify=verify)
        with storage_errors(self.url, f"reading {reader.info.name}"):
            return reader.read()

    def __iter__(self) -> Iterator[ShardRecords]:
        for info in self.shards:
            yield self.read_shard(info)

    def has_tokenizer(self) -> bool:
        """Whether the builder stored a copy of the tokenizer in the cache."""
        with storage_errors(self.url, f"looking for {TOKENIZER_DIR}/"):
            return bool(self.manifest.tokenizer.files) or self.fs.isdir(
                join(self.root, TOKENIZER_DIR)
            )

    @contextlib.contextmanager
    def tokenizer_files(self) -> Iterator[str]:
        """A local folder with the cache's tokenizer copy, each file checked against the
        manifest's size and checksum; removed when the block ends.

        Files are copied, never opened in place, so a tokenizer loader never follows anything
        inside the cache. Raises `CacheNotFoundError` when the cache holds no tokenizer and
        `CacheCorruptError` when a file differs from what the manifest lists.
        """
        with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as target:
            with storage_errors(self.url, f"reading {TOKENIZER_DIR}/"):
                files = list(self._tokenizer_bytes())
            for name, data in files:
                with open(os.path.join(target, name), "wb") as f:
                    f.write(data)
            yield target

    def _tokenizer_bytes(self) -> Iterator[tuple[str, bytes]]:
        """Each file of the copy, read without following links and never past its declared
        size (+1 byte, to see that it grew)."""
        folder = join(self.root, TOKENIZER_DIR)
        listed = self.manifest.tokenizer.files
        if not listed:  # a 1.x cache: no checksums to hold the files to
            if not self.fs.isdir(folder):
                raise CacheNotFoundError(
                    f"{self.url} holds no tokenizer copy", hint="pass --tokenizer PATH"
                )
            for path in sorted(self.fs.ls(folder, detail=False))[:1024]:
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if not name.startswith(".") and self.fs.isfile(path):
                    data = read_bounded(self.fs, path, MAX_TOKENIZER_FILE_BYTES, root=self.root)
                    if len(data) > MAX_TOKENIZER_FILE_BYTES:
                        raise CacheCorruptError(
                            f"{self.url}: {TOKENIZER_DIR}/{name} is larger than "
                            f"{MAX_TOKENIZER_FILE_BYTES >> 20} MiB, more than a tokenizer file",
                            hint="pass --tokenizer PATH",
                        )
                    yield name, data
            return
        for entry in listed:
            path = join(folder, entry.name)
            where = f"{self.url}: {TOKENIZER_DIR}/{entry.name}"
            if not self.fs.exists(path):
                raise CacheNotFoundError(
                    f"{where} is listed in the manifest but missing",
                    hint="restore the tokenizer/ folder from the cache's producer, or pass --tokenizer PATH",
                )
            data = read_bounded(self.fs, path, entry.nbytes, root=self.root)
            if file_info(entry.name, data) != entry:
                raise CacheCorruptError(
                    f"{where} does not match the manifest's size and checksum",
                    hint="restore the tokenizer/ folder from the cache's producer, or pass --tokenizer PATH",
                )
            yield entry.name, data

    def __repr__(self) -> str:
        m = self.manifest
        return f"Cache({self.url!r}, {m.format}, k={m.layout.k}, {len(m.shards)} shards, {m.num_tokens} tokens, {m.status})"


def open_cache(url: str, *, require_complete: bool = False, **storage_options: Any) -> Cache:
    """Open the cache at a local path or fsspec URL, checking its manifest.

    On a local filesystem the root is resolved once (it may be a link) and everything a reader
    may open (manifest.json, shards/, commits/, tokenizer/) is checked to hold no link and no
    special file, before anything is read: a cache is untrusted input.
    """
    fs, root = resolve(url, **storage_options)
    with storage_errors(url, "opening the cache"):
        root = real_root(fs, root)
        check_cache_tree(fs, root, (MANIFEST, SHARD_DIR, COMMITS, TOKENIZER_DIR))
        path = join(root, MANIFEST)
        if not fs.exists(path):
            what = "no cache" if not fs.exists(root) else f"no {MANIFEST} in it"
            raise CacheNotFoundError(
                f"{url}: {what}",
                hint="check the path, or build a cache there with `kdcache build --out ...`",
            )
        manifest = read_manifest(fs, path)
    if require_complete and manifest.status != "complete":
        raise IncompatibleCacheError(
            f"{url} is still being built ({len(manifest.shards)} shards so far)",
            hint="finish it by re-running the same `kdcache build` command, which resumes",
        )
    return Cache(url, fs, root, manifest)


def read_manifest(fs: AbstractFileSystem, path: str) -> Manifest:
    """Parse the manifest at `path`: a regular file (no link) of at most `MAX_MANIFEST_BYTES`."""
    data = read_bounded(fs, path, MAX_MANIFEST_BYTES, root=path.rsplit("/", 1)[0])
    hint = "restore the manifest from the cache's producer, or rebuild the cache"
    return parse_manifest(decode_json(data, MAX_MANIFEST_BYTES, path, hint=hint), where=path)


def file_info(name: str, data: bytes) -> FileInfo:
    """Size and checksum of one file of the tokenizer copy."""
    return FileInfo(
        name=name, nbytes=len(data), checksum="sha256:" + hashlib.sha256(data).hexdigest()
    )


# Imported last because `schemas.writer` imports the names above from here (at the top, the two
# would import each other before either is done). Re-exported so that code written before the
# writer had its own module (`from schemas.cache import CacheWriter`) keeps working.
from schemas.writer import (  # noqa: E402
    CacheWriter,
    check_output,
    check_staged_name,
    describe_difference,
    differences,
)

__all__ = [
    "BACKENDS",
    "COMMITS",
    "MANIFEST",
    "TOKENIZER_DIR",
    "Backend",
    "Cache",
    "CacheWriter",
    "check_output",
    "check_staged_name",
    "describe_difference",
    "differences",
    "file_info",
    "open_cache",
    "read_manifest",
]
