"""How a shard stores the teacher's top-k ids and log-probabilities (pure numpy, no torch).

A `TopkEncoding` names one id encoding and one value encoding. It declares the arrays it stores
(`columns`, before any data exists), turns `(ids, logprobs)` into those arrays (`encode`) and
back (`decode`). Every array has the token axis first; the backends compress each one with
Blosc(zstd) and the byte shuffle the column asks for. The measured trade-offs (bytes per token,
decode speed, error, KL) are in BENCHMARKS.md, produced by `python -m bench.encodings`.

Id encodings (the decoded ids are always exact and in the teacher's rank order):

- ``uint16``: the ids as they are, two bytes each (vocabularies up to 65,536).
- ``uint32``: the ids as they are, four bytes each (any vocabulary).
- ``sorted``: each row's id *set* sorted and stored as gaps (small numbers when the top-k
  crowds the frequent low ids), plus the rank order as a Lehmer code relative to id order (one
  digit per rank, small when ranks follow ids). See `schemas._lehmer`.

Value encodings (log-probabilities; decoded values are <= 0 and non-increasing along k):

- ``float32``: exact.
- ``float16``: IEEE half precision, relative error <= 2^-11.
- ``bfloat16``: bfloat16 (round to nearest even), relative error <= 2^-8.
- ``q8``: 8-bit codes of the distance x below the row's top-1 (the top-1 itself is kept exactly,
  in float32), uniform steps of 1/16 nat over 15.97 nats.
- ``q8c``: companded 8-bit codes: steps of 1/32 nat at the top-1 growing as 1/32 * (1 + x / 2),
  fine where the probability mass is and coarse in the tail.
- ``q8c-coarse``: companded, steps of 1/16 * (1 + x / 2): the smallest value stream measured.

float16 and bfloat16 store their bit patterns, and the q formats their codes, as differences
along k (the values are sorted, so these are small); decoding is a cumulative sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from schemas._lehmer import lehmer_decode, lehmer_encode

__all__ = [
    "ID_ENCODINGS",
    "VALUE_ENCODINGS",
    "Column",
    "TopkEncoding",
    "default_encoding",
]

Shuffle = Literal["bitshuffle", "shuffle", "noshuffle"]

ID_ENCODINGS: tuple[str, ...] = ("uint16", "uint32", "sorted")
"""Valid `TopkEncoding.ids` names."""

_FLOAT_VALUES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _Quantizer:
    """Codes c = round(g(x)) of the distance x = top1 - logprob >= 0 below the row's top-1.

    g(x) = x / step for a uniform grid (``knee`` = inf), else (knee / step) * log1p(x / knee):
    the step is `step` at the top-1 and grows linearly, as step * (1 + x / knee).
    """

    step: float
    knee: float
    max_code: int = 255

    def forward(self, x: np.ndarray) -> np.ndarray:
        if math.isinf(self.knee):
            return x / self.step
        return (self.knee / self.step) * np.log1p(x / self.knee)

    def inverse(self, c: np.ndarray) -> np.ndarray:
        c = np.asarray(c, dtype=np.float64)
        if math.isinf(self.knee):
            return c * self.step
        return self.knee * np.expm1(c * self.step / self.knee)

    @property
    def range(self) -> float:
        """Largest distance below the top-1 whose code is not clipped."""
        return float(self.inverse(np.float64(self.max_code + 0.5)))

    def bound(self, x: np.ndarray) -> np.ndarray:
        """|decoded - exact| <= bound(x) for x <= range (half a step at x, rounded up)."""
        if math.isinf(self.knee):
            return np.full_like(x, self.step / 2)
        # |g(x) - c| <= 1/2 and x + knee = knee * e^(g(x) * step / knee), so
        # |x - g^-1(c)| <= (x + knee) * (e^h - 1); the factor e^h on top is slack for float32
        h = self.step / (2 * self.knee)
        return (x + self.knee) * math.expm1(h) * math.exp(h)

    @cached_property
    def table(self) -> np.ndarray:
        """Decoded distance of every code, float32 (one gather per value when decoding)."""
        return self.inverse(np.arange(self.max_code + 1)).astype(np.float32)


_QUANTIZERS: dict[str, _Quantizer] = {
    "q8": _Quantizer(step=1 / 16, knee=math.inf),
    "q8c": _Quantizer(step=1 / 32, knee=2.0),
    "q8c-coarse": _Quantizer(step=1 / 16, knee=2.0),
}

VALUE_ENCODINGS: tuple[str, ...] = (*_FLOAT_VALUES, *_QUANTIZERS)
"""Valid `TopkEncoding.values` names."""

BOUND_RANGE = 32.0
"""`max_abs_error` covers log-probs >= -BOUND_RANGE for the float formats, and log-probs within
BOUND_RANGE nats of the top-1 for the q formats (or their clipping range, if smaller): below
that a probability is < 1.3e-14 (of the top-1's), too small to matter to any loss."""

_F16_MAX = 65504.0
_BF16_MAX = float(np.array(0x7F7F0000, dtype=np.uint32).view(np.float32))


@dataclass(frozen=True)
class Column:
    """One stored per-token array: its first axis is the token axis (length N)."""

    name: str
    dtype: str
    """numpy dtype name, e.g. ``"uint16"``."""
    shape: tuple[int, ...]
    """Trailing shape after the token axis: ``(k,)`` or ``()``."""
    shuffle: Shuffle
    """The Blosc shuffle that suits the column's bytes."""
    meaning: str


def _choices(kind: str, name: object, valid: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown {kind} encoding {name!r}; valid names: {', '.join(valid)}")


@dataclass(frozen=True)
class TopkEncoding:
    """The stored form of the top-k ids and log-probabilities of a cache (in the manifest)."""

    ids: str
    """One of `ID_ENCODINGS`."""
    values: str
    """One of `VALUE_ENCODINGS`."""

    def __post_init__(self) -> None:
        if self.ids not in ID_ENCODINGS:
            raise _choices("id", self.ids, ID_ENCODINGS)
        if self.values not in VALUE_ENCODINGS:
            raise _choices("value", self.values, VALUE_ENCODINGS)

    # -- declaration -------------------------------------------------------------------------

    def columns(self, k: int, vocab_size: int) -> dict[str, Column]:
        """The arrays this encoding stores for top-`k` lists over `vocab_size` ids."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        cols: list[Column] = []
        wide = "uint16" if vocab_size <= 1 << 16 else "uint32"
        if self.ids == "uint16":
            if vocab_size > 1 << 16:
                raise ValueError(
                    f"id encoding 'uint16' holds ids < 65536 but the vocabulary has {vocab_size};"
                    " use ids='uint32' or ids='sorted'"
                )
            cols.append(Column("topk_ids", "uint16", (k,), "shuffle", "top-k ids, rank order"))
        elif self.ids == "uint32":
            cols.append(Column("topk_ids", "uint32", (k,), "shuffle", "top-k ids, rank order"))
        else:
            cols += [
                Column(
                    "topk_id_gaps",
                    wide,
                    (k,),
                    "shuffle",
                    "the top-k ids in ascending order, as differences (the first from 0)",
                ),
                Column(
                    "topk_id_lehmer",
                    "uint8" if k <= 256 else "uint16",
                    (k,),
                    "bitshuffle",
                    "rank order as a Lehmer code relative to id order",
                ),
            ]
        cols += self.value_columns(k).values()
        return {c.name: c for c in cols}

    def value_columns(self, width: int, prefix: str = "topk_logprob") -> dict[str, Column]:
        """The arrays that store (N, width) log-probs in this value encoding, named from
        `prefix`: ``{prefix}s`` (float32), ``{prefix}_{values}_bits`` (float16, bfloat16), or
        ``{prefix}_top1`` and ``{prefix}_codes`` (q formats). Samples use prefix
        ``sample_logprob`` in caches with compact samples."""
        if self.values == "float32":
            cols = [Column(f"{prefix}s", "float32", (width,), "shuffle", "log-probs")]
        elif self.values in ("float16", "bfloat16"):
            cols = [
                Column(
                    f"{prefix}_{self.values}_bits",
                    "uint16",
                    (width,),
                    "shuffle",
                    f"{self.values} bit patterns of the log-probs, differenced along the row",
                )
            ]
        else:
            cols = [
                Column(f"{prefix}_top1", "float32", (), "shuffle", "the row's first log-prob"),
                Column(
                    f"{prefix}_codes",
                    "uint8",
                    (width,),
                    "bitshuffle",
                    f"{self.values} codes of the distance below the first, differenced along "
                    "the row",
                ),
            ]
        return {c.name: c for c in cols}

    # -- encode / decode ---------------------------------------------------------------------

    def encode(
        self, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int
    ) -> dict[str, np.ndarray]:
        """The stored arrays for `ids` (N, k) and `logprobs` (N, k), rank order, non-increasing."""
        ids = np.asarray(ids)
        logprobs = np.asarray(logprobs, dtype=np.float32)
        if ids.ndim != 2 or ids.shape != logprobs.shape:
            raise ValueError(
                f"ids and logprobs must both be (N, k); got {ids.shape} and {logprobs.shape}"
            )
        n, k = ids.shape
        cols = self.columns(k, vocab_size)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"top-k ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}"
            )
        out: dict[str, np.ndarray] = {}
        if self.ids == "sorted":
            order = np.argsort(ids, axis=1, kind="stable")  # (N, k) rank at each sorted slot
            ranked = np.take_along_axis(ids, order, axis=1).astype(np.int64)
            slot = np.empty_like(order)  # (N, k) sorted slot of each rank: the inverse
            np.put_along_axis(slot, order, np.broadcast_to(np.arange(k), order.shape), axis=1)
            out["topk_id_gaps"] = np.diff(ranked, axis=1, prepend=np.zeros((n, 1), np.int64))
            out["topk_id_lehmer"] = lehmer_encode(slot)
        else:
            out["topk_ids"] = ids
        out.update(self.encode_values(logprobs))
        return {
            name: np.ascontiguousarray(out[name], dtype=col.dtype) for name, col in cols.items()
        }

    def encode_values(self, lp: np.ndarray, prefix: str = "topk_logprob") -> dict[str, np.ndarray]:
        """The `value_columns` arrays for log-probs `lp` (N, width), non-increasing along rows."""
        lp = np.asarray(lp, dtype=np.float32)
        if self.values == "float32":
            return {f"{prefix}s": lp}
        if self.values == "float16":
            bits = np.maximum(lp, -_F16_MAX).astype(np.float16).view(np.uint16)
        elif self.values == "bfloat16":
            b32 = np.maximum(lp, -_BF16_MAX).view(np.uint32)
            b32 = b32 + np.uint32(0x7FFF) + ((b32 >> np.uint32(16)) & np.uint32(1))
            bits = (b32 >> np.uint32(16)).astype(np.uint16)
        if self.values in ("float16", "bfloat16"):  # wrapping differences: exact both ways
            name = f"{prefix}_{self.values}_bits"
            return {name: np.diff(bits, axis=1, prepend=np.zeros_like(bits[:, :1]))}
        q = _QUANTIZERS[self.values]
        top1 = lp[:, :1]
        x = np.maximum(top1.astype(np.float64) - lp, 0.0)
        codes = np.clip(np.rint(q.forward(x)), 0, q.max_code).astype(np.int16)
        codes = np.maximum.accumulate(codes, axis=1)  # ranks never decode above the one before
        return {
            f"{prefix}_top1": lp[:, 0] if lp.shape[1] else np.zeros(len(lp), np.float32),
            f"{prefix}_codes": np.diff(codes, axis=1, prepend=np.zeros_like(codes[:, :1])).astype(
                np.uint8
            ),
        }

    def decode(self, parts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, k) int32 in rank order, logprobs (N, k) float32) from the stored arrays."""
        if self.ids == "sorted":
            gaps = np.asarray(parts["topk_id_gaps"])
            ranked = np.cumsum(gaps, axis=1, dtype=np.int32)  # (N, k) ids in ascending order
            digits = np.asarray(parts["topk_id_lehmer"])
            if (digits >= np.arange(digits.shape[1], 0, -1)).any():  # digit r must be < k - r
                raise ValueError("corrupt topk_id_lehmer: a digit is out of range")
            slot = lehmer_decode(digits)  # (N, k)
            ids = np.take_along_axis(ranked, slot, axis=1)
        else:
            ids = np.asarray(parts["topk_ids"]).astype(np.int32)
        return ids, self.decode_values(parts)

    def decode_values(
        self, parts: Mapping[str, np.ndarray], prefix: str = "topk_logprob"
    ) -> np.ndarray:
        """(N, width) float32 log-probs from the `value_columns` arrays named from `prefix`."""
        if self.values == "float32":
            return np.asarray(parts[f"{prefix}s"]).astype(np.float32)
        if self.values in ("float16", "bfloat16"):
            diffs = np.asarray(parts[f"{prefix}_{self.values}_bits"])
            bits = np.cumsum(diffs, axis=1, dtype=np.uint16)  # wraps mod 2^16, as encoded
            if self.values == "float16":
                return bits.view(np.float16).astype(np.float32)
            return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
        q = _QUANTIZERS[self.values]
        codes = np.cumsum(np.asarray(parts[f"{prefix}_codes"]), axis=1, dtype=np.int16)
        if codes.size and codes[:, -1].max() > q.max_code:  # codes never decrease along k
            raise ValueError(f"corrupt {prefix}_codes: a code exceeds {q.max_code}")
        top1 = np.asarray(parts[f"{prefix}_top1"], dtype=np.float32)
        return top1[:, None] - q.table[codes]  # (N, k); a nonnegative table keeps it <= top1 <= 0

    # -- error bound -------------------------------------------------------------------------

    def error_bound(self) -> str:
        """The guarantee on decoded log-probabilities, in words."""
        if self.values == "float32":
            return "exact"
        if self.values == "float16":
            return (
                "|error| <= 2^-11 * |logprob| (float16 rounding), for logprob >= -65504; "
                f"so <= {self.max_abs_error()} nats for logprob >= -{BOUND_RANGE:g}"
            )
        if self.values == "bfloat16":
            return (
                "|error| <= 2^-8 * |logprob| (bfloat16 rounding); "
                f"so <= {self.max_abs_error()} nats for logprob >= -{BOUND_RANGE:g}"
            )
        q = _QUANTIZERS[self.values]
        grid = (
            f"uniform steps of {q.step:g} nat"
            if math.isinf(q.knee)
            else f"steps of {q.step:g} * (1 + x / {q.knee:g}) nat at a distance x below the top-1"
        )
        return (
            f"top-1 exact; the others on {grid}, |error| <= half a step: "
            f"<= {self.max_abs_error():.4g} nats within {min(q.range, BOUND_RANGE):.4g} nats of "
            f"the top-1; values more than {q.range:.4g} nats below it decode to top-1 - "
            f"{float(q.table[-1]):.4g} (too high, for a probability < e^-{q.range:.4g} of the "
            "top-1's)"
        )

    def max_abs_error(self) -> float | None:
        """Bound on |decoded - exact| over the range `error_bound` names (None: exact)."""
        if self.values == "float32":
            return None
        if self.values == "float16":
            return 2.0**-11 * BOUND_RANGE
        if self.values == "bfloat16":
            return 2.0**-8 * BOUND_RANGE
        q = _QUANTIZERS[self.values]
        return float(q.bound(np.array(min(q.range, BOUND_RANGE))))

    def abs_error_bounds(self, logprobs: np.ndarray) -> np.ndarray:
        """Per-element bound on |decoded - exact| for exact `logprobs` (N, k); inf where none.

        The quantised formats give no absolute bound for values clipped below their range (see
        `error_bound`); float16 gives none below -65504.
        """
        lp = np.asarray(logprobs, dtype=np.float64)
        if self.values == "float32":
            return np.zeros_like(lp)
        if self.values == "float16":  # half an ulp, and the subnormal spacing near zero
            return np.where(lp >= -_F16_MAX, np.maximum(2.0**-11 * -lp, 2.0**-25), np.inf)
        if self.values == "bfloat16":
            return np.maximum(2.0**-8 * -lp, 2.0**-134)
        q = _QUANTIZERS[self.values]
        x = lp[:, :1] - lp
        return np.where(x <= q.range, q.bound(np.maximum(x, 0.0)), np.inf)

    # -- manifest ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "values": self.values}

    def describe(self) -> dict[str, Any]:
        """`to_json` plus the parameters a reader without kdcache needs to decode the values
        (written into every shard's metadata; see schemas/FORMAT.md)."""
        out = self.to_json()
        if self.values in _QUANTIZERS:
            q = _QUANTIZERS[self.values]
            out["value_params"] = {
                "step": q.step,
                "knee": None if math.isinf(q.knee) else q.knee,
                "max_code": q.max_code,
            }
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TopkEncoding:
        """Parse `to_json` output; unknown names raise ValueError listing the valid ones."""
        if not isinstance(d, Mapping) or set(d) != {"ids", "values"}:
            raise ValueError(f"an encoding is {{'ids': ..., 'values': ...}}, got {d!r}")
        return cls(ids=d["ids"], values=d["values"])


def default_encoding(vocab_size: int) -> TopkEncoding:
    """The encoding a build uses unless told otherwise: plain ids and ``q8c`` values.

    Measured on the embedded teacher (`python -m bench.encodings`, BENCHMARKS.md). ``q8c``
    keeps the mean top-k KL near 1e-4 nats, a tenth of the 1e-3 goal, in a fifth of float32's
    bytes. Plain ids (``uint16`` up to 65,536 ids, else ``uint32``) decode at memory speed and
    stay readable as ids in Arrow, DuckDB or pandas; ``sorted`` saved only 2-3 % on the
    embedded teacher (about a fifth on a less trained one, whose top-k sets crowd together)
    for a decode about a hundred times slower, so it is an option, not the default.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return TopkEncoding(ids="uint16" if vocab_size <= 1 << 16 else "uint32", values="q8c")
