"""How faithful a cache is to its teacher, measured while it is built, from the exact values.

A shard writer measures every batch of records it is given before encoding them (the
records still hold the teacher's float32 log-probabilities and its exact tail), and its
`ShardInfo` carries the sums (`ShardFidelity`). The manifest's `fidelity` block (`Fidelity`)
is their total, so `kdcache inspect` shows it without reading a shard, and a resumed build
gets the same block as an uninterrupted one.

Per position: the tail mass left outside the top-k, the entropy of the renormalised top-k,
and whether the actual next token is in the top-k. On every `SAMPLE_EVERY`-th position: the
encoding's error, as the largest |decoded - exact| log-probability (over the range the
encoding's bound covers, `TopkEncoding.abs_error_bounds`) and the KL divergence of the
decoded renormalised top-k from the exact one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np

from schemas.encodings import TopkEncoding
from schemas.record import ShardRecords

SAMPLE_EVERY = 8
"""One position in this many is encoded and decoded to measure the encoding's error."""


@dataclass(frozen=True, kw_only=True)
class ShardFidelity:
    """Sums over one shard's positions (sums, so that shards add up exactly)."""

    positions: int = 0
    tail_mass_sum: float = 0.0
    topk_entropy_sum: float = 0.0
    """Nats, of the top-k renormalised to sum to one."""
    label_positions: int = 0
    """Positions that have a next token (all but each sequence's last)."""
    label_in_topk: int = 0
    sampled_positions: int = 0
    max_abs_logprob_error: float = 0.0
    topk_kl_sum: float = 0.0

    def __add__(self, other: ShardFidelity) -> ShardFidelity:
        sums = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
            if f.name != "max_abs_logprob_error"
        }
        worst = max(self.max_abs_logprob_error, other.max_abs_logprob_error)
        return ShardFidelity(**sums, max_abs_logprob_error=worst)


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """The manifest's block: means over every position of the cache."""

    positions: int
    mean_tail_mass: float
    """Probability the teacher puts outside its top-k."""
    mean_topk_entropy_nats: float
    label_in_topk: float | None
    """Share of positions whose actual next token is in the teacher's top-k."""
    encoding_sampled_positions: int
    encoding_max_abs_logprob_error: float
    """Largest |decoded - exact| log-probability seen (0.0 for float32)."""
    encoding_mean_topk_kl: float
    """Mean KL(exact renormalised top-k || decoded renormalised top-k), nats."""


def measure(records: ShardRecords, encoding: TopkEncoding, vocab_size: int) -> ShardFidelity:
    """The fidelity sums of `records`, whose log-probabilities are still exact."""
    n = records.num_tokens
    if n == 0:
        return ShardFidelity()
    lp = records.topk_logprobs  # (N, k) float32
    p = np.exp(lp)  # (N, k)
    # Entropy of p renormalised by its sum Z: log Z - sum(p log p) / Z (one exp, no log per id).
    z = p.sum(axis=1, dtype=np.float64)  # (N,)
    plogp = np.where(p > 0, p * lp, 0.0).sum(axis=1, dtype=np.float64)  # (N,)
    entropy = np.log(np.maximum(z, 1e-300)) - plogp / np.maximum(z, 1e-300)
    entropy = np.where(z > 0, entropy, 0.0)  # no top-k (samples only): nothing to measure
    # The next token of position t is input t + 1 of the same sequence.
    has_next = np.ones(n, dtype=bool)
    ends = records.seq_offsets[1:][np.diff(records.seq_offsets) > 0] - 1
    has_next[ends] = False
    nxt = np.append(records.input_ids[1:], -1)
    in_topk = (records.topk_ids == nxt[:, None]).any(axis=1) & has_next

    rows = np.arange(0, n if lp.shape[1] else 0, SAMPLE_EVERY)  # no top-k: nothing encoded
    exact = records.topk_logprobs[rows]
    decoded = exact
    if rows.size:
        _, decoded = encoding.decode(encoding.encode(records.topk_ids[rows], exact, vocab_size))
    covered = np.isfinite(encoding.abs_error_bounds(exact)) & np.isfinite(exact)
    error = np.abs(decoded.astype(np.float64) - exact)[covered]
    return ShardFidelity(
        positions=n,
        tail_mass_sum=float(np.exp(records.log_tail.astype(np.float64)).sum()),
        topk_entropy_sum=float(entropy.sum()),
        label_positions=int(has_next.sum()),
        label_in_topk=int(in_topk.sum()),
        sampled_positions=int(rows.size),
        max_abs_logprob_error=float(error.max()) if error.size else 0.0,
        topk_kl_sum=float(_renormalised_kl(exact, decoded).sum()),
    )


def _renormalised_kl(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """KL(softmax(exact) || softmax(decoded)) per row, both over the same k ids."""
    a = exact.astype(np.float64)
    b = decoded.astype(np.float64)
    la = a - np.logaddexp.reduce(a, axis=1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=1, keepdims=True)
    pa = np.exp(la)
    return np.where(pa > 0, pa * (la - np.where(np.isfinite(lb), lb, 0.0)), 0.0).sum(axis=1)


def summarize(parts: Iterable[ShardFidelity | None]) -> Fidelity | None:
    """The manifest block for shards with these sums (None when any shard has none)."""
    total = ShardFidelity()
    for part in parts:
        if part is None:
            return None
        total = total + part
    if total.positions == 0:
        return None
    n, s = total.positions, max(total.sampled_positions, 1)
    return Fidelity(
        positions=n,
        mean_tail_mass=total.tail_mass_sum / n,
        mean_topk_entropy_nats=total.topk_entropy_sum / n,
        label_in_topk=(
            total.label_in_topk / total.label_positions if total.label_positions else None
        ),
        encoding_sampled_positions=total.sampled_positions,
        encoding_max_abs_logprob_error=total.max_abs_logprob_error,
        encoding_mean_topk_kl=total.topk_kl_sum / s,
    )
