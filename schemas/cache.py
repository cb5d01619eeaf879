"""A cache on disk or object storage: open it to read, or write one shard at a time.

Commit protocol (what makes a build crash-safe and resumable):
1. a shard is written under a temporary name in `staging/`, checksummed, moved into `shards/`;
2. its `ShardInfo` is written atomically to `commits/<index>.json`: from here on it is committed;
3. the manifest owner (rank 0) rewrites `manifest.json` listing every committed shard, and at
   the end marks it `complete`.
A reader only ever looks at shards the manifest lists, so it never sees a half-written one; a
rerun finds the committed shards in `commits/` and writes only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from schemas._arrow import ArrowShardReader, ArrowShardWriter
from schemas._zarr import ZarrShardReader, ZarrShardWriter
from schemas.backend import STAGING_DIR, ShardReader, ShardWriter, shard_metadata
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError, IncompatibleCacheError
from schemas.fidelity import summarize
from schemas.manifest import (
    SHARD_DIR,
    FileInfo,
    Manifest,
    ShardInfo,
    parse_manifest,
    parse_shard_info,
    to_json,
)
from schemas.record import Layout, ShardRecords
from schemas.storage import join, resolve, write_bytes_atomic
from schemas.version import FORMAT_VERSION, parse_version, producer

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
        self.encoding = TopkEncoding.from_json(manifest.encoding)
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
        return self.reader(shard, verify=verify).read()

    def __iter__(self) -> Iterator[ShardRecords]:
        for info in self.shards:
            yield self.read_shard(info)

    def has_tokenizer(self) -> bool:
        """Whether the builder stored a copy of the tokenizer in the cache."""
        return bool(self.manifest.tokenizer.files) or self.fs.isdir(join(self.root, TOKENIZER_DIR))

    @contextlib.contextmanager
    def tokenizer_files(self) -> Iterator[str]:
        """A local folder with the cache's tokenizer copy, each file checked against the
        manifest's size and checksum; removed when the block ends.

        Files are copied, never opened in place, so a tokenizer loader never follows anything
        inside the cache. Raises `CacheNotFoundError` when the cache holds no tokenizer and
        `CacheCorruptError` when a file differs from what the manifest lists.
        """
        with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as target:
            for name, data in self._tokenizer_bytes():
                with open(os.path.join(target, name), "wb") as f:
                    f.write(data)
            yield target

    def _tokenizer_bytes(self) -> Iterator[tuple[str, bytes]]:
        folder = join(self.root, TOKENIZER_DIR)
        listed = self.manifest.tokenizer.files
        if not listed:  # a 1.x cache: no checksums to hold the files to
            if not self.fs.isdir(folder):
                raise CacheNotFoundError(
                    f"{self.url} holds no tokenizer copy", hint="pass --tokenizer PATH"
                )
            for path in sorted(self.fs.ls(folder, detail=False)):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if not name.startswith(".") and self.fs.isfile(path):
                    yield name, self.fs.cat_file(path)
            return
        for entry in listed:
            path = join(folder, entry.name)
            where = f"{self.url}: {TOKENIZER_DIR}/{entry.name}"
            if not self.fs.exists(path):
                raise CacheNotFoundError(
                    f"{where} is listed in the manifest but missing",
                    hint="restore the tokenizer/ folder from the cache's producer, or pass --tokenizer PATH",
                )
            data = self.fs.cat_file(path)
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
    """Open the cache at a local path or fsspec URL, checking its manifest."""
    fs, root = resolve(url, **storage_options)
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
    try:
        data = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(
            f"{path} is not valid JSON ({exc})", hint="restore the manifest or rebuild the cache"
        ) from None
    return parse_manifest(data, where=path)


class CacheWriter:
    """Creates or resumes the cache at `url` for a build described by `draft`.

    `draft` is the manifest of the finished cache minus its shards. `owner` is the one process
    (rank 0) that rewrites the manifest; every rank writes and commits its own shards.
    """

    def __init__(
        self,
        url: str,
        draft: Manifest,
        *,
        overwrite: bool = False,
        owner: bool = True,
        **storage_options: Any,
    ) -> None:
        self.url, self.owner = url, owner
        self.fs, self.root = resolve(url, **storage_options)
        self.draft = dataclasses.replace(
            draft,
            shards=(),
            status="building",
            schema_version=FORMAT_VERSION,
            created_by=producer(),
        )
        self.backend = BACKENDS[draft.format]
        self.encoding = TopkEncoding.from_json(draft.encoding)
        self.existing = self._existing(overwrite)
        if owner and self.existing is None:
            self.fs.makedirs(self.root, exist_ok=True)
            self._write_manifest(self.draft)

    def _existing(self, overwrite: bool) -> Manifest | None:
        path = join(self.root, MANIFEST)
        if not self.fs.exists(path):
            return None
        old = read_manifest(self.fs, path)
        if old.fingerprint == self.draft.fingerprint:
            return old
        if not overwrite:
            raise IncompatibleCacheError(
                f"{self.url} holds a cache made with other settings ({describe_difference(old, self.draft)})",
                hint="choose another --out, or pass --overwrite to replace it",
            )
        if self.owner:
            for name in (MANIFEST, COMMITS, SHARD_DIR, STAGING_DIR, TOKENIZER_DIR):
                if self.fs.exists(join(self.root, name)):
                    self.fs.rm(join(self.root, name), recursive=True)
        return None

    @property
    def complete(self) -> bool:
        return self.existing is not None and self.existing.status == "complete"

    def committed(self) -> dict[int, ShardInfo]:
        """Every committed shard by index: those listed in the manifest and those in commits/."""
        found = {s.index: s for s in (self.existing.shards if self.existing else ())}
        folder = join(self.root, COMMITS)
        if self.fs.exists(folder):
            for path in sorted(self.fs.ls(folder, detail=False)):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                # Another rank's commit record may be half-written under a .tmp- name.
                if name.endswith(".json") and not name.startswith(".tmp-"):
                    info = parse_shard_info(json.loads(self.fs.cat_file(path)), path)
                    found[info.index] = info
        return found

    def shard_writer(self, index: int) -> ShardWriter:
        identity = {"cache_fingerprint": self.draft.fingerprint}
        return self.backend.writer(
            self.fs, self.root, index, self.draft.layout, self.encoding, identity
        )

    def store_tokenizer(self, files: Mapping[str, bytes]) -> None:
        """Write the tokenizer copy (the draft's `tokenizer.files` must list these bytes)."""
        if tuple(file_info(n, d) for n, d in sorted(files.items())) != self.draft.tokenizer.files:
            raise ValueError("the tokenizer files differ from the draft manifest's list")
        for name, data in sorted(files.items()):
            write_bytes_atomic(self.fs, join(self.root, TOKENIZER_DIR, name), data)

    def commit(self, info: ShardInfo) -> None:
        """Make a finished shard part of the cache."""
        blob = json.dumps(dataclasses.asdict(info), indent=1).encode()
        write_bytes_atomic(self.fs, join(self.root, COMMITS, f"{info.index:06d}.json"), blob)
        if self.owner:
            self._write_manifest(self.draft.with_shards(self.committed().values()))

    def finalize(self, num_shards: int, **updates: Any) -> Manifest:
        """Mark the cache complete once shards 0..num_shards-1 are all committed (owner only)."""
        shards = self.committed()
        missing = sorted(set(range(num_shards)) - set(shards))
        if missing:
            raise CacheCorruptError(
                f"{self.url}: cannot finalize, shards {missing[:10]} were never committed",
                hint="re-run the build; it resumes and writes the missing shards",
            )
        listed = [shards[i] for i in range(num_shards)]
        updates.setdefault("fidelity", summarize(s.fidelity for s in listed))
        manifest = dataclasses.replace(self.draft, **updates).with_shards(listed, status="complete")
        self._write_manifest(manifest)
        return manifest

    def remove_temporaries(self, indices: set[int] | None = None) -> None:
        """Delete leftovers of crashed writers (only for `indices`, when other ranks are writing).

        Staged shards are `staging/<index>-<tag><suffix>`; caches of format 1.x staged theirs
        as `shards/.tmp-<index>-<tag><suffix>`."""
        for folder, prefix in ((STAGING_DIR, ""), (SHARD_DIR, ".tmp-")):
            path = join(self.root, folder)
            if not self.fs.isdir(path):
                continue
            for entry in self.fs.ls(path, detail=False):
                base = entry.rstrip("/").rsplit("/", 1)[-1]
                digits = base[len(prefix) : len(prefix) + 6]
                ours = indices is None or (digits.isdigit() and int(digits) in indices)
                if base.startswith(prefix) and digits.isdigit() and ours:
                    self.fs.rm(entry, recursive=True)

    def _write_manifest(self, manifest: Manifest) -> None:
        write_bytes_atomic(self.fs, join(self.root, MANIFEST), to_json(manifest).encode())


def file_info(name: str, data: bytes) -> FileInfo:
    """Size and checksum of one file of the tokenizer copy."""
    return FileInfo(
        name=name, nbytes=len(data), checksum="sha256:" + hashlib.sha256(data).hexdigest()
    )


def describe_difference(old: Manifest, new: Manifest) -> str:
    """Which settings differ between two manifests, in words."""
    diffs = []
    for section in ("format", "teacher", "tokenizer", "dataset", "build", "layout", "encoding"):
        a, b = getattr(old, section), getattr(new, section)
        if dataclasses.is_dataclass(a):
            a, b = dataclasses.asdict(a), dataclasses.asdict(b)
        if isinstance(a, dict):
            for key in sorted(set(a) | set(b)):
                if key != "config" and a.get(key) != b.get(key):
                    diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return "; ".join(diffs[:4]) or "same settings"
