"""Writing a cache: shard by shard, each committed so that a killed build resumes.

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

import dataclasses
import json
import posixpath
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem

from schemas._durable import sync_tree
from schemas._jsonparse import decode_json
from schemas.backend import STAGING_DIR, ShardWriter, publish_shard
from schemas.cache import BACKENDS, COMMITS, MANIFEST, TOKENIZER_DIR, file_info, read_manifest
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, IncompatibleCacheError
from schemas.fidelity import summarize
from schemas.lock import CacheLock, is_lock_file
from schemas.manifest import (
    MAX_COMMIT_BYTES,
    SHARD_DIR,
    Manifest,
    ShardInfo,
    parse_shard_info,
    to_json,
)
from schemas.storage import (
    check_url,
    checksum_file,
    checksum_tree,
    is_local,
    join,
    read_bounded,
    resolve,
    shown,
    storage_errors,
    write_bytes_atomic,
)
from schemas.version import producer, version_for


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
            schema_version=version_for(draft.layout.compact_samples),
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
