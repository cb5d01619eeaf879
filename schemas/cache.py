"""A cache on disk or object storage: open it to read, or write one shard at a time.

Commit protocol (what makes a build crash-safe and resumable):
1. a shard is written under a temporary name in `shards/`, checksummed, moved to its name;
2. its `ShardInfo` is written atomically to `commits/<index>.json`: from here on it is committed;
3. the manifest owner (rank 0) rewrites `manifest.json` listing every committed shard, and at
   the end marks it `complete`.
A reader only ever looks at shards the manifest lists, so it never sees a half-written one; a
rerun finds the committed shards in `commits/` and writes only the rest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from schemas._arrow import ArrowShardReader, ArrowShardWriter
from schemas._zarr import ZarrShardReader, ZarrShardWriter
from schemas.backend import ShardReader, ShardWriter
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError, IncompatibleCacheError
from schemas.manifest import SHARD_DIR, Manifest, ShardInfo, parse_manifest, to_json
from schemas.record import Layout, ShardRecords
from schemas.storage import join, resolve, write_bytes_atomic
from schemas.version import FORMAT_VERSION

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
        info = self.shards[shard] if isinstance(shard, int) else shard
        return self.backend.reader(
            self.fs, self.root, info, self.layout, self.encoding, verify=verify
        )

    def read_shard(self, shard: ShardInfo | int, *, verify: bool = True) -> ShardRecords:
        return self.reader(shard, verify=verify).read()

    def __iter__(self) -> Iterator[ShardRecords]:
        for info in self.shards:
            yield self.read_shard(info)

    def tokenizer_path(self) -> str | None:
        """Where the cache's copy of the tokenizer is, if the builder stored one."""
        path = join(self.root, TOKENIZER_DIR)
        return path if self.fs.exists(path) else None

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
            draft, shards=(), status="building", schema_version=FORMAT_VERSION
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
            for name in (MANIFEST, COMMITS, SHARD_DIR, TOKENIZER_DIR):
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
                    info = ShardInfo(**json.loads(self.fs.cat_file(path)))
                    found[info.index] = info
        return found

    def shard_writer(self, index: int) -> ShardWriter:
        identity = {"format_version": FORMAT_VERSION, "cache_fingerprint": self.draft.fingerprint}
        return self.backend.writer(
            self.fs, self.root, index, self.draft.layout, self.encoding, identity
        )

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
        manifest = dataclasses.replace(self.draft, **updates).with_shards(
            (shards[i] for i in range(num_shards)), status="complete"
        )
        self._write_manifest(manifest)
        return manifest

    def remove_temporaries(self, indices: set[int] | None = None) -> None:
        """Delete leftovers of crashed writers (only for `indices`, when other ranks are writing)."""
        folder = join(self.root, SHARD_DIR)
        if not self.fs.exists(folder):
            return
        for path in self.fs.ls(folder, detail=False):
            base = path.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(".tmp-") and (indices is None or int(base[5:11]) in indices):
                self.fs.rm(path, recursive=True)

    def _write_manifest(self, manifest: Manifest) -> None:
        write_bytes_atomic(self.fs, join(self.root, MANIFEST), to_json(manifest).encode())


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
