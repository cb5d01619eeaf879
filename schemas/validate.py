"""Check a cache: the manifest, every listed shard's bytes, and (deep) every record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.cache import Cache, open_cache
from schemas.errors import KdcacheError
from schemas.record import ShardRecords


@dataclass(frozen=True)
class Problem:
    where: str
    """The cache URL, or the shard's name."""
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def validate_cache(url: str, *, deep: bool = False, **storage_options: object) -> list[Problem]:
    """Every problem found, one per shard and check; an empty list means the cache is valid.

    Always: manifest schema and version, completeness, every listed shard present with the size
    and checksum the manifest gives. With `deep`: every record decoded and checked (ids inside
    the vocabulary, log-probabilities <= 0 and non-increasing within a token, finite
    log-sum-exp, counts matching the manifest, the shard's own identity matching the cache).
    """
    try:
        cache = open_cache(url, **storage_options)
    except KdcacheError as exc:
        return [Problem(url, str(exc))]
    problems = []
    if not cache.complete:
        problems.append(
            Problem(url, "the build has not finished (status 'building'); re-run it to resume")
        )
    for info in cache.shards:
        try:
            reader = cache.reader(info, verify=True)
            if deep:
                identity = reader.identity()
                if identity.get("cache_fingerprint") != cache.manifest.fingerprint:
                    problems.append(
                        Problem(info.name, "belongs to another cache (its fingerprint differs)")
                    )
                records = reader.read()
                problems += [
                    Problem(info.name, what)
                    for what in check_records(cache, info.num_tokens, info.num_sequences, records)
                ]
        except KdcacheError as exc:
            problems.append(
                Problem(info.name, exc.message + (f". Fix: {exc.hint}" if exc.hint else ""))
            )
    return problems


def check_records(cache: Cache, num_tokens: int, num_sequences: int, r: ShardRecords) -> list[str]:
    """What is wrong with one shard's decoded records (empty when nothing)."""
    vocab = cache.layout.vocab_size
    out = []
    if r.num_tokens != num_tokens or r.num_sequences != num_sequences:
        out.append(
            f"holds {r.num_tokens} tokens in {r.num_sequences} sequences, the manifest says "
            f"{num_tokens} in {num_sequences}"
        )
    for name in ("input_ids", "topk_ids", "sample_ids"):
        ids = getattr(r, name)
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            out.append(f"{name} has ids outside the vocabulary [0, {vocab})")
    lp = r.topk_logprobs
    if lp.size:
        if not np.all(lp <= 0):
            out.append(f"topk_logprobs has {int(np.sum(~(lp <= 0)))} values > 0 or NaN")
        if lp.shape[1] > 1 and np.any(np.diff(lp, axis=1) > 0):
            bad = int(np.any(np.diff(lp, axis=1) > 0, axis=1).sum())
            out.append(f"topk_logprobs increase along k at {bad} tokens (must be in rank order)")
    if not np.all(np.isfinite(r.lse)):
        out.append(f"lse is not finite at {int(np.sum(~np.isfinite(r.lse)))} tokens")
    if np.any(r.log_tail > 0) or np.any(np.isnan(r.log_tail)):
        out.append("log_tail has values > 0 or NaN")
    return out
