"""Caches made from caches: merge, split and subset, moving shards rather than records.

Every operation runs in two passes. The first reads each source shard it needs (checked
against the manifest: size, checksum, identity) for its per-sequence content keys
(`document_hash`), window starts and lengths, and plans the output. So the derived manifest,
whose fingerprint every rewritten shard carries, is known before anything is written. The
second pass writes through the commit protocol of `CacheWriter`: a killed run, re-run with the
same arguments, resumes; a finished one says so.

Each output shard comes from one source shard (`schemas._transfer`): kept whole, it is taken
over unchanged (hard-linked or copied by the store); kept in part, its stored columns are
rewritten without decoding; with nothing kept, it is left out.

Only complete caches of format 2.0 or later qualify: 1.x caches carry no content keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem

from schemas._derive_write import Derived, Scanned, Take, write_derived
from schemas.cache import Cache, open_cache
from schemas.errors import CacheCorruptError, ConfigError, IncompatibleCacheError
from schemas.lock import CacheLock
from schemas.manifest import Manifest
from schemas.storage import is_local, resolve
from schemas.version import parse_version
from schemas.writer import differences

_MEANING = ("top_k", "max_length", "packing", "num_samples", "sample_temperature",
            "temperatures", "dtype")  # fmt: skip
MERGE_FIELDS: dict[str, tuple[str, ...] | None] = {
    "format": None, "tokenizer": ("fingerprint",), "build": _MEANING, "layout": None,
    "encoding": None,
}  # fmt: skip
"""What must be equal for caches to merge (None: the whole section); the teacher is compared
by weights hash, or by name when neither cache has one (`merge_differences`)."""


def merge_differences(a: Manifest, b: Manifest) -> list[str]:
    """Why caches `a` and `b` cannot be merged ("section.key: a -> b" each); empty: they can."""
    hashed = a.teacher.weights_sha256 or b.teacher.weights_sha256
    teacher = ("weights_sha256",) if hashed else ("name_or_path",)
    return differences(a, b, {**MERGE_FIELDS, "teacher": teacher})


@dataclass(frozen=True)
class DeriveResult:
    """What `merge_caches`, `split_cache` or `subset_cache` did; `summary()` is one line."""

    operation: str
    outputs: tuple[Derived, ...]
    source_tokens: int
    dropped: tuple[int, int, int] = (0, 0, 0)
    """Duplicates a merge dropped: documents, sequences, tokens."""

    def summary(self) -> str:
        out = self.outputs[0]
        if self.operation == "merge":
            docs, seqs, tokens = self.dropped
            return (f"merged into {out.url}: {out.brief()}; dropped {docs:,} duplicate documents "
                    f"({seqs:,} sequences, {tokens:,} tokens)")  # fmt: skip
        if self.operation == "split":
            val = self.outputs[1]
            share = val.tokens / max(self.source_tokens, 1)
            return (f"split into train {out.url}: {out.brief()}; val {val.url}: {val.brief()}; "
                    f"val holds {share:.1%} of the tokens")  # fmt: skip
        return f"subset into {out.url}: {out.brief()}, of {self.source_tokens:,} tokens"


# -- the three operations ----------------------------------------------------------------------


def merge_caches(
    sources: Sequence[str],
    out: str,
    *,
    overwrite: bool = False,
    break_lock: bool = False,
    **storage_options: Any,
) -> DeriveResult:
    """Merge caches of the same teacher, tokenizer, layout, encoding and build settings.

    A document (content key) held by several caches is kept once: the first cache in `sources`
    that holds it keeps all its windows, later caches drop every sequence of it.
    """
    if len(sources) < 2:
        raise ConfigError(
            f"merge needs at least two caches, got {len(sources)}", hint="name every CACHE"
        )
    caches = [_open_source(url, storage_options) for url in sources]
    for url, cache in zip(sources[1:], caches[1:], strict=True):
        if diffs := merge_differences(caches[0].manifest, cache.manifest):
            raise IncompatibleCacheError(
                f"cannot merge {sources[0]} and {url}: {'; '.join(diffs[:4])}",
                hint="merge only caches built with the same teacher, tokenizer and settings",
            )
    _check_outputs([out], caches, storage_options)
    takes: list[Take] = []
    seen = np.zeros(0, dtype=np.uint64)
    dropped_docs = dropped_seqs = dropped_tokens = 0
    for index, cache in enumerate(caches):
        scanned = list(_scan(index, cache))
        for shard in scanned:
            duplicate = np.isin(shard.keys, seen)
            dropped_seqs += int(duplicate.sum())
            dropped_tokens += int(shard.lengths[duplicate].sum())
            if not duplicate.any():
                takes.append(Take(shard))
            elif not duplicate.all():
                takes.append(Take(shard, np.flatnonzero(~duplicate)))
        keys = np.concatenate([s.keys for s in scanned] or [seen[:0]])
        dropped_docs += int(np.isin(np.unique(keys), seen).sum())
        seen = np.union1d(seen, keys)
    options = {"deduplicate": "document_hash"}
    with _locked([out], "kdcache merge", break_lock, storage_options) as locks:
        derived = write_derived(
            out, "merge", caches, options, takes, overwrite, locks[0], storage_options
        )
    total = sum(c.manifest.num_tokens for c in caches)
    return DeriveResult("merge", (derived,), total, (dropped_docs, dropped_seqs, dropped_tokens))


def split_cache(
    source: str,
    *,
    val_fraction: float,
    out_train: str,
    out_val: str,
    seed: int = 0,
    overwrite: bool = False,
    break_lock: bool = False,
    **storage_options: Any,
) -> DeriveResult:
    """Split a cache by whole documents: every window of a document goes to the same side.

    Documents are ordered by `document_order(seed, key)` (independent of shard order) and
    taken into val until it holds at least `val_fraction` of the tokens; the rest is train.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}",
            hint="e.g. --val-fraction 0.05",
        )
    cache = _open_source(source, storage_options)
    _check_outputs([out_train, out_val], [cache], storage_options)
    scanned = list(_scan(0, cache))
    keys = np.concatenate([s.keys for s in scanned] or [np.zeros(0, np.uint64)])
    lengths = np.concatenate([s.lengths for s in scanned] or [np.zeros(0, np.int64)])
    val_docs = val_documents(keys, lengths, val_fraction, seed)
    parts: dict[str, list[Take]] = {"train": [], "val": []}
    for shard in scanned:
        is_val = np.isin(shard.keys, val_docs)
        for part, mask in (("train", ~is_val), ("val", is_val)):
            if mask.all():
                parts[part].append(Take(shard))
            elif mask.any():
                parts[part].append(Take(shard, np.flatnonzero(mask)))
    for part, takes in parts.items():
        if not takes:
            raise ConfigError(
                f"--val-fraction {val_fraction} leaves the {part} part of {source} empty "
                f"(it holds {len(np.unique(keys))} documents)",
                hint="choose a fraction that leaves documents on both sides",
            )
    outputs = []
    # Both outputs are locked before either is written: a refusal leaves neither half done.
    with _locked([out_train, out_val], "kdcache split", break_lock, storage_options) as locks:
        for (part, url), lock in zip((("train", out_train), ("val", out_val)), locks, strict=True):
            options = {"val_fraction": val_fraction, "seed": seed, "part": part}
            takes = parts[part]
            outputs.append(
                write_derived(
                    url, "split", [cache], options, takes, overwrite, lock, storage_options
                )
            )
    return DeriveResult("split", tuple(outputs), int(lengths.sum()))


def subset_cache(
    source: str,
    *,
    max_tokens: int,
    out: str,
    overwrite: bool = False,
    break_lock: bool = False,
    **storage_options: Any,
) -> DeriveResult:
    """The longest run of whole sequences, from the start of the cache in its order, that
    holds at most `max_tokens` tokens: whole shards taken over, the last one cut (rewritten)."""
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    cache = _open_source(source, storage_options)
    _check_outputs([out], [cache], storage_options)
    takes: list[Take] = []
    used = first = 0
    for shard in _scan(0, cache):
        first = first or int(shard.lengths[shard.lengths > 0][:1].sum())
        fits = int(np.searchsorted(np.cumsum(shard.lengths), max_tokens - used, side="right"))
        if fits == len(shard.lengths):
            takes.append(Take(shard))
        elif fits:
            takes.append(Take(shard, np.arange(fits)))
        used += int(shard.lengths[:fits].sum())
        if fits < len(shard.lengths):
            break
    if used == 0:
        raise ConfigError(
            f"--max-tokens {max_tokens} keeps nothing of {source}: its first sequence holds "
            f"{first} tokens",
            hint=f"give --max-tokens {first} or more",
        )
    options = {"max_tokens": max_tokens}
    with _locked([out], "kdcache subset", break_lock, storage_options) as locks:
        derived = write_derived(
            out, "subset", [cache], options, takes, overwrite, locks[0], storage_options
        )
    return DeriveResult("subset", (derived,), cache.manifest.num_tokens)


def val_documents(keys: np.ndarray, lengths: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The sorted content keys of a split's val part.

    `keys` and `lengths` are per sequence; a document's tokens are those of all its sequences.
    Documents in `document_order`, taken until they hold at least `fraction` of the tokens.
    """
    docs, inverse = np.unique(np.asarray(keys, dtype=np.uint64), return_inverse=True)
    if docs.size == 0:
        return docs
    tokens = np.zeros(docs.size, dtype=np.int64)
    np.add.at(tokens, inverse.reshape(-1), np.asarray(lengths, dtype=np.int64))
    rank = np.array([document_order(seed, int(d)) for d in docs], dtype=np.uint64)
    order = np.lexsort((docs, rank))  # by rank; the key breaks (astronomically rare) ties
    held = np.cumsum(tokens[order])
    count = int(np.searchsorted(held, fraction * held[-1], side="left")) + 1
    return np.sort(docs[order[:count]])


def document_order(seed: int, key: int) -> int:
    """A document's place in a split: BLAKE2b-64 of its content key (8 bytes little-endian),
    keyed with the seed (8 bytes little-endian, signed), read as a little-endian integer."""
    digest = hashlib.blake2b(
        int(key).to_bytes(8, "little"),
        key=int(seed).to_bytes(8, "little", signed=True),
        digest_size=8,
    )
    return int.from_bytes(digest.digest(), "little")


# -- reading the sources -----------------------------------------------------------------------


def _open_source(url: str, storage_options: dict[str, Any]) -> Cache:
    cache = open_cache(url, require_complete=True, **storage_options)
    version = cache.manifest.schema_version
    if parse_version(version)[0] < 2 or not cache.layout.content_keys:
        raise IncompatibleCacheError(
            f"{url} is a format {version} cache without content keys (document_hash), which "
            "merge, split and subset need to keep documents whole",
            hint="rebuild it with this kdcache (same kdcache build command) to get format 2.0",
        )
    return cache


def _scan(source: int, cache: Cache) -> Iterator[Scanned]:
    """Each listed shard's per-sequence facts, the shard checked against the manifest."""
    for info in cache.shards:
        stored = cache.reader(info).read_stored()
        lengths = np.diff(stored.seq_offsets)
        if stored.num_tokens != info.num_tokens or stored.num_sequences != info.num_sequences:
            raise CacheCorruptError(
                f"shard {info.name} of {cache.url} holds {stored.num_tokens} tokens in "
                f"{stored.num_sequences} sequences, the manifest says {info.num_tokens} in "
                f"{info.num_sequences}",
                hint="run `kdcache validate --deep` on it and restore it from its producer",
            )
        seq = stored.sequences
        yield Scanned(source, info, seq["document_hash"], seq["source_start"], lengths)


@contextlib.contextmanager
def _locked(
    outs: list[str], command: str, break_lock: bool, storage_options: dict[str, Any]
) -> Iterator[list[CacheLock]]:
    """The lock on each output, taken in order, all released when the block ends."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                CacheLock.acquire(url, command=command, break_lock=break_lock, **storage_options)
            )
            for url in outs
        ]


def _check_outputs(outs: list[str], sources: list[Cache], storage_options: dict[str, Any]) -> None:
    """Refuse an output that is a source or another output (it would be overwritten)."""
    places = [(c.fs, _real(c.fs, c.root), c.url) for c in sources]
    for out in outs:
        fs, root = resolve(out, **storage_options)
        for other_fs, other_root, url in places:
            if other_fs == fs and other_root == _real(fs, root):
                raise ConfigError(
                    f"the output {out} is also {url}", hint="write the result to another place"
                )
        places.append((fs, _real(fs, root), out))


def _real(fs: AbstractFileSystem, root: str) -> str:
    return os.path.realpath(root) if is_local(fs) else root
