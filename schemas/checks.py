"""What decoded shard records must satisfy before anyone uses them.

A checksum only says a shard's bytes are the ones its manifest entry lists; a forged entry, a
buggy producer or a hand-edited manifest lists bad bytes just as well. So the trainer and
`kdcache validate --deep` check what they decode, with the same code:

- `check_records`: cheap and vectorised (a few passes over each array, most of them a single
  reduction), run by the trainer on every shard it reads. It catches what would make training
  crash or silently learn garbage: ids outside the vocabulary, NaN or positive log-probs,
  non-finite log-sum-exps, NaN labels in mid-sequence, sample counts that do not add up,
  offsets out of range, counts other than the manifest's.
- `check_records_deep`: what only validation pays for: duplicate ids in a top-k row, values out
  of rank order, arrays that hold nothing but the fill value, and the agreement of the label's
  and the tail's log-probabilities with the top-k, within the encoding's error bound.

Each problem is one line naming the field and how many positions fail; an empty list means
the records passed. numpy only.
"""

from __future__ import annotations

import functools

import numpy as np

from schemas.encodings import BOUND_RANGE, TopkEncoding
from schemas.manifest import ShardInfo
from schemas.record import Layout, ShardRecords

FILL_MIN_TOKENS = 64
"""A shard of at least this many tokens whose array is all zeros (the fill value a Zarr array
reads where no chunk was stored) is reported; below it, zeros could be real."""
FILL_MIN_SEQUENCES = 8
"""The same for per-sequence arrays (content keys)."""
_SLACK = 1.05
"""Bounds are evaluated at decoded values, not the exact ones they are defined at: a little slack."""
_TAIL_TOLERANCE = 1e-4
"""Probability mass float32 rounding may move between the top-k and the tail."""


def check_records(
    records: ShardRecords, layout: Layout, info: ShardInfo | None = None
) -> list[str]:
    """The cheap checks: what is wrong with one shard's decoded records (empty when nothing).

    `info` is the shard's manifest entry, whose token and sequence counts the records must have.
    """
    n = records.num_tokens
    problems = _structure_problems(records, layout)
    if problems:
        return problems  # every check below needs sane offsets, dtypes and shapes
    if info is not None and (n, records.num_sequences) != (info.num_tokens, info.num_sequences):
        problems.append(
            f"counts: holds {n} tokens in {records.num_sequences} sequences, the manifest says "
            f"{info.num_tokens} in {info.num_sequences}"
        )
    vocab = layout.vocab_size
    for name in ("input_ids", "topk_ids", "sample_ids"):
        ids = getattr(records, name)
        if ids is not None and (bad := _ids_outside(ids, vocab)):
            problems.append(
                f"{name}: {bad} of {n} positions hold ids outside the vocabulary [0, {vocab})"
            )
    for name in ("topk_logprobs", "log_tail", "sample_logprobs"):
        values = getattr(records, name)
        # One reduction on the common path (max propagates NaN); count only when it fails.
        if values is not None and values.size and not values.max() <= 0:
            bad = _count_rows(~(values <= 0))
            problems.append(f"{name}: {bad} of {n} positions hold NaN or values > 0")
    for name in ("lse", "temp_lse"):
        values = getattr(records, name)
        if values is not None and (bad := _count_rows(~np.isfinite(values))):
            problems.append(f"{name}: {bad} of {n} positions are not finite")
    label = records.label_logprob
    bad_label = ~(label <= 0)  # (N,) NaN or positive
    last = last_positions(records.seq_offsets)
    bad_label[last] = label[last] > 0  # no next token: NaN is the expected value there
    if bad := int(bad_label.sum()):
        problems.append(
            f"label_logprob: {bad} of {n} positions hold NaN or values > 0 (NaN belongs only at "
            "a sequence's last position)"
        )
    if records.sample_counts is not None:
        drawn = records.sample_counts.sum(axis=1, dtype=np.int64)  # (N,)
        if layout.compact_samples and layout.k:  # only the draws outside the top-k are listed
            if bad := int(np.count_nonzero(drawn > layout.num_samples)):
                problems.append(
                    f"sample_counts: {bad} of {n} positions add up to more than the "
                    f"{layout.num_samples} draws per position"
                )
        elif bad := int(np.count_nonzero(drawn != layout.num_samples)):
            problems.append(
                f"sample_counts: {bad} of {n} positions do not add up to the "
                f"{layout.num_samples} draws per position"
            )
    return problems


def check_records_deep(records: ShardRecords, layout: Layout, encoding: TopkEncoding) -> list[str]:
    """The checks only `validate --deep` pays for; run `check_records` first (this one assumes
    shapes and offsets hold, and skips positions whose values are NaN)."""
    if _structure_problems(records, layout):
        return []  # reported by `check_records`; nothing below can be computed
    n = records.num_tokens
    problems = []
    ids, lp = records.topk_ids, records.topk_logprobs
    if layout.k > 1 and n:
        ranked = np.sort(ids, axis=1)
        if bad := _count_rows(ranked[:, 1:] == ranked[:, :-1]):
            problems.append(f"topk_ids: {bad} of {n} positions list an id twice")
        if bad := _count_rows(np.diff(lp, axis=1) > 0):
            problems.append(
                f"topk_logprobs: {bad} of {n} positions are out of rank order (values must not "
                "increase along k)"
            )
    if records.sample_ids is not None and records.sample_counts is not None and n:
        # Padding (count 0) repeats a real id; the drawn ids themselves must be distinct.
        padding = -1 - np.arange(layout.num_samples)  # (samples,) distinct, never an id
        drawn = np.sort(np.where(records.sample_counts > 0, records.sample_ids, padding), axis=1)
        if bad := _count_rows(drawn[:, 1:] == drawn[:, :-1]):
            problems.append(f"sample_ids: {bad} of {n} positions list a drawn id twice")
        if layout.compact_samples:
            problems += _compact_sample_problems(records, layout)
    problems += _fill_problems(records)
    if n and layout.k:  # a samples-only cache has no top-k values to check the label against
        bounds = _decoded_bounds(encoding, lp, layout.vocab_size)
        problems += _label_problems(records, bounds)
        problems += _tail_problems(records, bounds)
    return problems


def _compact_sample_problems(records: ShardRecords, layout: Layout) -> list[str]:
    """Compact samples list only ids outside the top-k, real slots first, by log-prob."""
    assert records.sample_ids is not None and records.sample_counts is not None
    assert records.sample_logprobs is not None
    n, out = records.num_tokens, []
    real = records.sample_counts > 0  # (N, n)
    if bad := _count_rows(~real[:, :-1] & real[:, 1:]):
        out.append(f"sample_counts: {bad} of {n} positions have padding before a drawn id")
    lp = np.where(real, records.sample_logprobs, -np.inf)
    with np.errstate(invalid="ignore"):  # -inf - -inf between padding slots: NaN, not > 0
        rising = np.diff(lp, axis=1) > 0
    if bad := _count_rows(rising):
        out.append(
            f"sample_logprobs: {bad} of {n} positions are out of order (compact samples are "
            "listed by descending log-prob)"
        )
    inside = np.zeros(n, dtype=bool)
    for lo in range(0, n, 4096):  # (rows, n, k) at a time: bounded memory
        block = slice(lo, lo + 4096)
        hit = records.sample_ids[block, :, None] == records.topk_ids[block, None, :]
        inside[block] = (hit.any(-1) & real[block]).any(-1)
    if bad := int(inside.sum()):
        out.append(
            f"sample_ids: {bad} of {n} positions list a draw inside the top-k (compact samples "
            "keep only the draws outside it)"
        )
    return out


def last_positions(offsets: np.ndarray) -> np.ndarray:
    """(S',) token index of each non-empty sequence's last position."""
    ends = offsets[1:]
    return ends[ends > offsets[:-1]] - 1


# -- cheap helpers ----------------------------------------------------------------------------


def _structure_problems(records: ShardRecords, layout: Layout) -> list[str]:
    """Offsets, dtypes and shapes: decoding checked them already, other callers may not have."""
    problems = _offset_problems(records.seq_offsets, records.num_tokens)
    if not problems:
        try:
            records.check(layout)
        except ValueError as exc:
            problems.append(_one_line(str(exc)))
    return problems


def _offset_problems(offsets: np.ndarray, n: int) -> list[str]:
    if offsets.ndim != 1 or offsets.shape[0] < 1 or offsets.dtype.kind not in "iu":
        return [f"seq_offsets: expected int64 [S+1], got {offsets.dtype}{list(offsets.shape)}"]
    out = []
    if offsets[0] != 0 or offsets[-1] != n:
        out.append(f"seq_offsets: run from {offsets[0]} to {offsets[-1]}, not from 0 to N={n}")
    if bad := int(np.count_nonzero((offsets < 0) | (offsets > n))):
        out.append(f"seq_offsets: {bad} of {offsets.shape[0]} offsets lie outside [0, {n}]")
    if bad := int(np.count_nonzero(np.diff(offsets) < 0)):
        out.append(
            f"seq_offsets: {bad} of {offsets.shape[0] - 1} sequences end before they start "
            "(offsets decrease)"
        )
    return out


def _ids_outside(ids: np.ndarray, vocab: int) -> int:
    """Positions (rows) of int32 `ids` holding an id < 0 or >= vocab."""
    if ids.size == 0:
        return 0
    # As uint32 a negative int32 id is >= 2^31 > vocab: one reduction checks both ends.
    unsigned = ids.view(np.uint32)
    if int(unsigned.max()) < vocab:
        return 0
    return _count_rows(unsigned >= vocab)


def _count_rows(bad: np.ndarray) -> int:
    """Positions (first axis) with any True in `bad`."""
    if not bad.size:
        return 0
    return int(np.count_nonzero(bad.reshape(bad.shape[0], -1).any(axis=1)))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# -- deep helpers -----------------------------------------------------------------------------


def _fill_problems(records: ShardRecords) -> list[str]:
    """Arrays that are zero (or NaN where NaN is allowed) everywhere: never written."""
    out = []
    n, s = records.num_tokens, records.num_sequences
    checked = ("input_ids", "topk_ids", "topk_logprobs", "lse", "log_tail", "label_logprob")
    for name in (*checked, "temp_lse", "sample_logprobs"):
        values = getattr(records, name)
        if values is None or n < FILL_MIN_TOKENS or not values.size:
            continue
        if name == "log_tail" and not records.topk_ids.shape[1]:
            continue  # no top-k: all the mass is in the tail, log_tail is 0 everywhere
        zero = values == 0
        if name == "label_logprob":
            zero |= np.isnan(values)
        if zero.all():
            out.append(
                f"{name}: all {n} positions hold 0, the fill value of an array that was never "
                "written (a chunk lost or zeroed)"
            )
    hashes = records.document_hash
    if hashes is not None and s >= FILL_MIN_SEQUENCES and not hashes.any():
        out.append(f"document_hash: all {s} sequences hold 0, the fill value")
    return out


@functools.lru_cache(maxsize=32)
def _floor_distance(encoding: TopkEncoding, vocab_size: int) -> float:
    """How far below the top-1 the lowest value the encoding decodes lies (the quantised
    formats clip there: what decodes to it may lie anywhere further down)."""
    probe = np.array([[0.0, -1e30]], dtype=np.float32)  # a value far below every range
    stored = encoding.encode(np.array([[0, 1]]), probe, max(vocab_size, 2))
    return float(-encoding.decode(stored)[1][0, 1])


def _decoded_bounds(encoding: TopkEncoding, lp: np.ndarray, vocab_size: int) -> np.ndarray:
    """(N, k) bound on |decoded - exact| for decoded values `lp`; inf where the encoding gives
    none: values below -BOUND_RANGE, BOUND_RANGE below the top-1, or at the clipping floor."""
    with np.errstate(invalid="ignore"):
        x = lp[:, :1].astype(np.float64) - lp  # distance below the top-1
        floor = min(BOUND_RANGE, _floor_distance(encoding, vocab_size))
        trusted = (lp >= -BOUND_RANGE) & (x < floor * (1 - 1e-6))
        bounds = encoding.abs_error_bounds(lp) * _SLACK + 1e-5 * np.maximum(1.0, -lp)
    return np.where(trusted, bounds, np.inf)


def _label_problems(records: ShardRecords, bounds: np.ndarray) -> list[str]:
    """The label's log-prob must equal its top-k value when it is in the top-k, and not exceed
    the k-th value when it is not (each within the encoding's bound)."""
    n = records.num_tokens
    has_next = np.ones(n, dtype=bool)
    has_next[last_positions(records.seq_offsets)] = False
    rows = np.flatnonzero(has_next)  # position t has label input_ids[t + 1]
    usable = ~np.isnan(records.label_logprob[rows]) & ~np.isnan(records.topk_logprobs[rows]).any(1)
    rows = rows[usable]  # NaN values are reported by `check_records`
    if not rows.size:
        return []
    label_lp = records.label_logprob[rows].astype(np.float64)
    labels = records.input_ids[rows + 1]
    match = records.topk_ids[rows] == labels[:, None]  # (m, k)
    inside = match.any(axis=1)
    at = match.argmax(axis=1)
    value = records.topk_logprobs[rows, at].astype(np.float64)
    bound = bounds[rows, at]
    last = records.topk_logprobs[rows, -1].astype(np.float64)
    with np.errstate(invalid="ignore"):
        close = (label_lp == value) | (np.abs(label_lp - value) <= bound)  # == holds for -inf
        wrong_in = inside & ~close
        wrong_out = ~inside & ~(label_lp <= last + bounds[rows, -1])
    out = []
    if bad := int(wrong_in.sum()):
        out.append(
            f"label_logprob: {bad} of {n} positions differ from the top-k value of their label "
            "(the next input id) by more than the encoding's error"
        )
    if bad := int(wrong_out.sum()):
        out.append(
            f"label_logprob: {bad} of {n} positions give a label outside the top-k a higher "
            "log-prob than the k-th"
        )
    return out


def _tail_problems(records: ShardRecords, bounds: np.ndarray) -> list[str]:
    """1 - sum(top-k probs) must equal exp(log_tail), within what the encoding may move."""
    lp = records.topk_logprobs.astype(np.float64)
    tail = records.log_tail.astype(np.float64)
    usable = ~np.isnan(lp).any(axis=1) & ~np.isnan(tail)
    p = np.exp(lp)  # (N, k)
    with np.errstate(invalid="ignore", over="ignore"):
        # Unbounded values lie far down: their exact probability is below the decoded one.
        moved = np.where(np.isfinite(bounds), p * np.expm1(bounds), p).sum(axis=1)
        gap = np.abs(1.0 - p.sum(axis=1) - np.exp(tail))
    bad = int(np.count_nonzero(usable & ~(gap <= moved + _TAIL_TOLERANCE)))
    if not bad:
        return []
    return [
        f"log_tail: {bad} of {records.num_tokens} positions disagree with the top-k (1 - the "
        "sum of top-k probabilities differs from exp(log_tail) by more than the encoding's error)"
    ]
