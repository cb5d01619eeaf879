"""Check a cache: its manifest, every listed shard's bytes and identity, and (deep) every record.

A problem is reported where it lies. What only the manifest can be wrong about (its shard list,
its totals, settings every shard disagrees with) is blamed on `manifest.json`, not on each
shard; what one shard gets wrong names that shard. Plain validation reads no shard data beyond
sizes, checksums and each shard's own metadata; `deep` decodes every record and runs the same
content checks the trainer runs (`schemas.checks`) plus the deep ones, and checks the
tokenizer copy.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from schemas._zarr import ZarrShardReader
from schemas.backend import ShardReader
from schemas.cache import MANIFEST, TOKENIZER_DIR, Cache, open_cache
from schemas.checks import check_records, check_records_deep
from schemas.errors import CacheCorruptError, KdcacheError
from schemas.manifest import SHARD_DIR, ShardInfo
from schemas.storage import shown, storage_errors

_DECODE_KEYS = ("layout", "encoding")
"""Identity keys without which a shard cannot be decoded with the manifest's settings."""


@dataclass(frozen=True)
class Problem:
    where: str
    """The cache URL, `manifest.json`, a shard's name, or a `tokenizer/` file."""
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def validate_cache(url: str, *, deep: bool = False, **storage_options: object) -> list[Problem]:
    """Every problem found, one per place and check; an empty list means the cache is valid.

    Always: manifest schema and version, completeness, the shard list (indices 0..n-1 each once,
    no name twice, no unlisted shard in shards/, token total equal to the dataset's), every
    listed shard present with the size and checksum the manifest gives and its own metadata
    (cache, index, layout, encoding) matching its entry. With `deep`: every record decoded and
    checked (`schemas.checks`), Zarr chunks all stored, and the tokenizer copy checked against
    the manifest and parsed.
    """
    try:
        cache = open_cache(url, **storage_options)
    except KdcacheError as exc:
        return [Problem(url, _text(exc))]
    problems = []
    if not cache.complete:
        problems.append(
            Problem(url, "the build has not finished (status 'building'); re-run it to resume")
        )
    try:
        problems += [Problem(MANIFEST, what) for what in manifest_problems(cache)]
    except KdcacheError as exc:  # listing shards/ failed
        problems.append(Problem(url, _text(exc)))
    opened = []
    for info in cache.shards:
        try:
            opened.append(_open(cache, info))
        except KdcacheError as exc:
            problems.append(Problem(info.name, _text(exc)))
    blamed = _blame_manifest(opened)
    # The fingerprint covers the layout and encoding: when those differ, name them instead.
    named = [k for k in blamed if k != "cache_fingerprint" or not set(_DECODE_KEYS) & set(blamed)]
    for key in named:
        mine, theirs = opened[0].wrong[key], opened[0].found.get(key)
        problems.append(
            Problem(
                MANIFEST,
                f"its {key} differs from what all {len(opened)} shards say "
                f"({_difference(mine, theirs)}): the manifest was edited after the build; "
                "restore it from the cache's producer",
            )
        )
    for shard in opened:
        wrong = {k: v for k, v in shard.wrong.items() if k not in blamed}
        problems += _identity_problems(shard.info, shard.reader, wrong)
        if deep and not set(_DECODE_KEYS) & (set(wrong) | set(blamed)):
            problems += _deep_shard_problems(cache, shard.info, shard.reader)
    if deep and cache.has_tokenizer():
        problems += tokenizer_problems(cache)
    return problems


def manifest_problems(cache: Cache) -> list[str]:
    """What is wrong with the manifest's shard list as a whole (empty when nothing)."""
    m = cache.manifest
    out = []
    names = Counter(s.name for s in m.shards)
    if twice := sorted(name for name, count in names.items() if count > 1):
        out.append(f"lists {', '.join(twice[:5])} more than once (one shard read twice)")
    if not cache.complete:  # ranks commit out of order: gaps are normal until the end
        return out
    indices = {s.index for s in m.shards}
    want = set(range(len(m.shards)))
    if indices != want:
        missing, extra = sorted(want - indices), sorted(indices - want)
        out.append(
            f"lists {len(m.shards)} shards whose indices are not 0..{len(m.shards) - 1}: "
            f"missing {missing[:10]}, unexpected {extra[:10]} (an entry was lost or its index "
            "edited); restore the manifest from the cache's producer"
        )
    if m.derived is None and m.num_tokens != m.dataset.num_tokens:
        out.append(
            f"its shards hold {m.num_tokens} tokens, its dataset.num_tokens says "
            f"{m.dataset.num_tokens} (a shard entry was lost, added or edited); restore the "
            "manifest from the cache's producer"
        )
    if unlisted := _unlisted_shards(cache):
        out.append(
            f"does not list {', '.join(unlisted[:5])}"
            + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
            + f", found in {SHARD_DIR}/ (a lost entry?); restore the manifest from the cache's "
            "producer"
        )
    return out


def check_manifest(cache: Cache, option: str) -> None:
    """Refuse a cache whose shard list `manifest_problems` finds wrong, in one line naming the
    command's `option`, the cache and manifest.json: what `kdcache validate` reports, refused
    before a consumer reads a shard (a lost entry would silently train on fewer shards, a
    doubled one on one shard twice)."""
    problems = manifest_problems(cache)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CacheCorruptError(
            f"{option} {shown(cache.url)}: {MANIFEST}: {problems[0]}{more}",
            hint=f"run `kdcache validate {shown(cache.url)}` to list every problem",
        )


def tokenizer_problems(cache: Cache) -> list[Problem]:
    """The tokenizer copy: each file against the manifest's size and checksum (format 2.0 on),
    and every JSON file parses."""
    try:
        with cache.tokenizer_files() as folder:
            out = []
            for name in sorted(os.listdir(folder)):
                if not name.endswith(".json"):
                    continue
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        json.loads(f.read())
                except (ValueError, RecursionError) as exc:
                    out.append(
                        Problem(
                            f"{TOKENIZER_DIR}/{name}",
                            f"is not valid JSON ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:120]}); restore the {TOKENIZER_DIR}/ "
                            "folder from the cache's producer",
                        )
                    )
            return out
    except KdcacheError as exc:
        return [Problem(f"{TOKENIZER_DIR}/", _text(exc))]


@dataclass(frozen=True)
class _Opened:
    """A listed shard whose size and checksum hold, with what its own metadata says."""

    info: ShardInfo
    reader: ShardReader
    found: dict[str, Any]
    """The shard's own metadata."""
    wrong: dict[str, Any]
    """What the manifest expects where the shard's metadata says otherwise."""


def _open(cache: Cache, info: ShardInfo) -> _Opened:
    with storage_errors(cache.url, f"reading {info.name}"):
        reader = cache.backend.reader(
            cache.fs, cache.root, info, cache.layout, cache.encoding, verify=True
        )
        found = reader.identity()
    expected = cache.expected_identity(info)
    return _Opened(info, reader, found, {k: v for k, v in expected.items() if found.get(k) != v})


def _blame_manifest(opened: list[_Opened]) -> list[str]:
    """Identity keys on which every readable shard (two or more) disagrees with the manifest:
    the manifest changed, not the shards. A lone shard cannot tell which side changed."""
    if len(opened) < 2:
        return []
    keys = set.intersection(*(set(shard.wrong) for shard in opened))
    return sorted(keys - {"shard_index"})


def _identity_problems(
    info: ShardInfo, reader: ShardReader, wrong: dict[str, Any]
) -> list[Problem]:
    out = []
    for key, value in wrong.items():
        try:
            reader.check_identity({key: value})  # raises, with the standard message
        except KdcacheError as exc:
            out.append(Problem(info.name, _text(exc)))
    return out


def _deep_shard_problems(cache: Cache, info: ShardInfo, reader: ShardReader) -> list[Problem]:
    try:
        records = reader.read()
        found = check_records(records, cache.layout, info)
        found += check_records_deep(records, cache.layout, cache.encoding)
        if isinstance(reader, ZarrShardReader):
            found += reader.missing_chunks()
    except KdcacheError as exc:
        return [Problem(info.name, _text(exc))]
    return [Problem(info.name, what) for what in found]


def _unlisted_shards(cache: Cache) -> list[str]:
    """Shards in shards/ that the manifest does not list (leftovers named `.tmp-*` aside)."""
    folder = f"{cache.root}/{SHARD_DIR}"
    with storage_errors(cache.url, f"listing {SHARD_DIR}/"):
        paths = cache.fs.ls(folder, detail=False) if cache.fs.isdir(folder) else []
    listed = {s.name for s in cache.shards}
    found = []
    for path in paths:
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if not base.startswith(".") and f"{SHARD_DIR}/{base}" not in listed:
            found.append(f"{SHARD_DIR}/{base}")
    return sorted(found)


def _difference(mine: object, theirs: object) -> str:
    """`mine` (the manifest's) against `theirs` (a shard's), naming only differing sub-keys."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return "; ".join(
            f"{k}: {_brief(mine.get(k))} here, {_brief(theirs.get(k))} in the shards"
            for k in keys[:3]
        )
    return f"{_brief(mine)} here, {_brief(theirs)} in the shards"


def _brief(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(exc: KdcacheError) -> str:
    return exc.message + (f". Fix: {exc.hint}" if exc.hint else "")
