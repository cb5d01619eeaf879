"""A cache on disk or object storage: open it to read, or write one shard at a time.

Commit protocol (what makes a build crash-safe and resumable):
1. a shard is written under a temporary name in `staging/` and checksummed (sealed);
2. its `ShardInfo`, with where it is staged, is written atomically to `commits/<index>.json`:
   from here on it is committed;
3. it is moved into `shards/` (published);
4. the manifest owner (rank 0) rewrites `manifest.json` listing every committed shard, and at
   the end marks it `complete`.
A reader only ever looks at shards the manifest lists, so it never sees a half-written one, and
a glob over `shards/` only ever sees committed shards. A rerun finds the committed shards in
`commits/`, finishes a move a killed run began (`recover`), and writes only the rest. While a
cache is `building`, its manifest may list a shard another rank has committed but not yet
moved; a `complete` one never does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from schemas._arrow import ArrowShardReader, ArrowShardWriter
from schemas._durable import sync_tree
from schemas._jsonparse import decode_json
from schemas._zarr import ZarrShardReader, ZarrShardWriter
from schemas.backend import (
    STAGING_DIR,
    ShardReader,
    ShardWriter,
    publish_shard,
    shard_metadata,
)
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError, IncompatibleCacheError
from schemas.fidelity import summarize
from schemas.lock import CacheLock, is_lock_file
from schemas.manifest import (
    MAX_COMMIT_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_TOKENIZER_FILE_BYTES,
    SHARD_DIR,
    FileInfo,
    Manifest,
    ShardInfo,
    parse_manifest,
    parse_shard_info,
    to_json,
)
from schemas.record import Layout, ShardRecords
from schemas.storage import (
    check_cache_tree,
    check_url,
    checksum_file,
    checksum_tree,
    is_local,
    join,
    read_bounded,
    real_root,
    resolve,
    shown,
    storage_errors,
    write_bytes_atomic,
)
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


def check_output(
    url: str, *, overwrite: bool = False, option: str = "--out", **storage_options: Any
) -> None:
    """Refuse `url` as the output of a build or a derivation when it is a directory that holds
    something other than a cache (`IncompatibleCacheError` naming `option`), unless `overwrite`:
    the cache would be mixed into someone's files. A cache, one a killed writer began (only
    kdcache's own entries, its lock, `.tmp-*` files of atomic writes), an empty directory and a
    missing one pass. One listing, so commands call it before any slow work; a scheme fsspec
    cannot open is refused first, naming `option`.
    """
    check_url(url, option)
    fs, root = resolve(url, **storage_options)
    with storage_errors(url, "checking the output"):
        if overwrite or not fs.isdir(root) or fs.exists(join(root, MANIFEST)):
            return
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    own = {MANIFEST, COMMITS, SHARD_DIR, STAGING_DIR, TOKENIZER_DIR}
    foreign = [
        n for n in names if n not in own and not n.startswith(".tmp-") and not is_lock_file(n)
    ]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise IncompatibleCacheError(
            f"{shown(url)} exists, is not empty and holds no kdcache cache "
            f"(it holds {foreign[0]!r}{more})",
            hint=f"choose another {option}, or pass --overwrite to write into it anyway",
        )


def read_manifest(fs: AbstractFileSystem, path: str) -> Manifest:
    """Parse the manifest at `path`: a regular file (no link) of at most `MAX_MANIFEST_BYTES`."""
    data = read_bounded(fs, path, MAX_MANIFEST_BYTES, root=path.rsplit("/", 1)[0])
    hint = "restore the manifest from the cache's producer, or rebuild the cache"
    return parse_manifest(decode_json(data, MAX_MANIFEST_BYTES, path, hint=hint), where=path)


class CacheWriter:
    """Creates or resumes the cache at `url` for a build described by `draft`.

    `draft` is the manifest of the finished cache minus its shards. `owner` is the one process
    (rank 0) that rewrites the manifest; every rank writes and commits its own shards. `lock`,
    the writer's `CacheLock` on `url` (taken by the caller, which can refuse before any slow
    work), is checked before every commit: a writer that lost it commits nothing more.
    """

    def __init__(
        self,
        url: str,
        draft: Manifest,
        *,
        overwrite: bool = False,
        owner: bool = True,
        lock: CacheLock | None = None,
        **storage_options: Any,
    ) -> None:
        self.url, self.owner, self.lock = url, owner, lock
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
        with storage_errors(url, "opening the cache for writing"):
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
        found.update({index: info for index, (info, _) in self._records().items()})
        return found

    def _records(self) -> dict[int, tuple[ShardInfo, str | None]]:
        """The commit records in commits/: each shard's entry and where it was staged."""
        found: dict[int, tuple[ShardInfo, str | None]] = {}
        folder = join(self.root, COMMITS)
        if not self.fs.exists(folder):
            return found
        for path in sorted(self.fs.ls(folder, detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            # Another rank's commit record may be half-written under a .tmp- name.
            if name.endswith(".json") and not name.startswith(".tmp-"):
                data = read_bounded(self.fs, path, MAX_COMMIT_BYTES, root=self.root)
                hint = "delete it: re-running the build rewrites that shard"
                record = decode_json(data, MAX_COMMIT_BYTES, path, hint=hint)
                staged = record.pop("staged", None) if isinstance(record, dict) else None
                if staged is not None:
                    check_staged_name(staged, path)
                info = parse_shard_info(record, path)
                found[info.index] = (info, staged)
        return found

    def recover(self, indices: set[int] | None = None) -> None:
        """Finish what a killed run left between committing a shard and moving it into
        `shards/` (only for `indices`, when other ranks are writing). Call before
        `remove_temporaries`, which would delete the staged copy."""
        for index, (info, staged) in self._records().items():
            if staged is None or (indices is not None and index not in indices):
                continue
            src = join(self.root, staged)
            if not self.fs.exists(src):
                continue  # the move finished
            if _staged_checksum(self.fs, src, self.root, info.nbytes) == info.checksum:
                publish_shard(self.fs, self.root, src, info.name)
                continue
            # The move had copied everything and was deleting the staged copy when killed.
            self.fs.rm(src, recursive=True)
            if not self.fs.exists(join(self.root, info.name)):  # neither copy whole: redo it
                self.fs.rm(join(self.root, COMMITS, f"{index:06d}.json"))

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

    def commit_shard(self, writer: ShardWriter, **updates: Any) -> ShardInfo:
        """Seal `writer`'s shard and commit it (its `ShardInfo` changed by `updates`)."""
        info = dataclasses.replace(writer.seal(), **updates)
        self.commit(info, staged=writer.tmp_path)
        return info

    def commit(self, info: ShardInfo, *, staged: str | None = None) -> None:
        """Make a finished shard part of the cache: its record, then (from `staged`, a sealed
        shard in `staging/`) its move into `shards/`, then the manifest."""
        if self.lock is not None:
            self.lock.check()
        record = dataclasses.asdict(info)
        if staged is not None:
            record["staged"] = posixpath.relpath(staged, self.root)
            if is_local(self.fs):  # the shard's bytes on the disk before the record naming them
                sync_tree(staged)
        blob = json.dumps(record, indent=1).encode()
        write_bytes_atomic(self.fs, join(self.root, COMMITS, f"{info.index:06d}.json"), blob)
        if staged is not None:
            publish_shard(self.fs, self.root, staged, info.name)
        if self.owner:
            self._write_manifest(self.draft.with_shards(self.committed().values()))

    def finalize(self, num_shards: int, **updates: Any) -> Manifest:
        """Mark the cache complete once shards 0..num_shards-1 are all committed (owner only)."""
        if self.lock is not None:
            self.lock.check()
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


def check_staged_name(name: object, where: str) -> None:
    """Refuse a commit record's staged path unless it is a plain name inside `staging/`."""
    if (
        not isinstance(name, str)
        or not name.startswith(STAGING_DIR + "/")
        or posixpath.normpath(name) != name
        or name.count("/") != 1
        or len(name) > 200
    ):
        raise CacheCorruptError(
            f"{where} names a staged shard {str(name)[:80]!r} outside {STAGING_DIR}/",
            hint="delete the commit record: re-running the build rewrites that shard",
        )


def _staged_checksum(fs: AbstractFileSystem, path: str, root: str, nbytes: int) -> str | None:
    """The checksum of a staged shard, or None when it is not whole (larger than declared)."""
    try:
        if fs.isdir(path):
            return checksum_tree(fs, path, root=root, declared=nbytes)[0]
        return checksum_file(fs, path, root=root, declared=nbytes)[0]
    except CacheCorruptError:
        return None


def file_info(name: str, data: bytes) -> FileInfo:
    """Size and checksum of one file of the tokenizer copy."""
    return FileInfo(
        name=name, nbytes=len(data), checksum="sha256:" + hashlib.sha256(data).hexdigest()
    )


def describe_difference(old: Manifest, new: Manifest) -> str:
    """Which settings differ between two manifests, in words."""
    return "; ".join(differences(old, new)[:4]) or "same settings"


def differences(
    old: Manifest, new: Manifest, fields: Mapping[str, tuple[str, ...] | None] | None = None
) -> list[str]:
    """Every setting that differs, as "section.key: old -> new".

    `fields` limits the comparison to its sections, and to the keys it names for a section
    (None: all of that section's keys); `kdcache merge` compares only what changes meaning.
    The build's `config` (how a cache was made, not what it holds) is never compared.
    """
    diffs = []
    for section in ("format", "teacher", "tokenizer", "dataset", "build", "layout", "encoding"):
        if fields is not None and section not in fields:
            continue
        a, b = getattr(old, section), getattr(new, section)
        if dataclasses.is_dataclass(a):
            a, b = dataclasses.asdict(a), dataclasses.asdict(b)
        if isinstance(a, dict):
            keys = (fields or {}).get(section) or sorted(set(a) | set(b))
            for key in keys:
                if key != "config" and a.get(key) != b.get(key):
                    diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return diffs
