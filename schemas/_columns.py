"""Records <-> the encoded columns a backend stores (the same for every backend).

`StoredShard` is a shard as it lies on disk, before decoding: the per-token columns in their
stored dtypes and encodings, the per-sequence columns, and the sequence offsets. Derived caches
(merge, split, subset) move `StoredShard`s, never decoded records, so what they copy stays
bit for bit what the build wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from schemas.encodings import Column, TopkEncoding
from schemas.record import FIELDS_BY_NAME, SEQUENCE, TOPK_FIELDS, Layout, ShardRecords

_ID_FIELDS = ("input_ids", "sample_ids")
SAMPLE_VALUES = "sample_logprobs"
SAMPLE_PREFIX = "sample_logprob"
"""Compact samples store their log-probs through the value encoding, under this prefix."""
_SHUFFLE = {"int": "bitshuffle", "uint": "bitshuffle", "float": "shuffle"}


def token_columns(layout: Layout, encoding: TopkEncoding) -> dict[str, Column]:
    """Every stored per-token array: name -> dtype, trailing shape and compression hint."""
    cols: dict[str, Column] = {}
    for f in layout.fields():
        if f.dims[0] == SEQUENCE:
            continue
        if f.name == "topk_ids":
            if layout.k:  # a samples-only cache stores no top-k
                cols.update(encoding.columns(layout.k, layout.vocab_size))
            continue
        if f.name in TOPK_FIELDS:
            continue
        if f.name == SAMPLE_VALUES and layout.compact_samples:
            cols.update(encoding.value_columns(layout.num_samples, SAMPLE_PREFIX))
            continue
        dtype = layout.id_dtype if f.name in _ID_FIELDS else f.dtype
        kind = np.dtype(dtype).kind
        shuffle = _SHUFFLE["float" if kind == "f" else "int"]
        cols[f.name] = Column(f.name, dtype, layout.trailing_shape(f), shuffle, f.meaning)
    return cols


def sequence_columns(layout: Layout | None = None) -> dict[str, str]:
    """Stored per-sequence arrays: name -> dtype (the offsets are stored by each backend).

    Without a layout: every per-sequence field the format knows.
    """
    return {
        f.name: f.dtype
        for f in FIELDS_BY_NAME.values()
        if f.dims[0] == SEQUENCE and (layout is None or layout.has(f.needs))
    }


@dataclass(frozen=True, eq=False)
class StoredShard:
    """Sequences in their stored form: what a backend writes and reads, undecoded."""

    tokens: dict[str, np.ndarray]
    """`token_columns` name -> (N, *shape) array in the column's stored dtype."""
    sequences: dict[str, np.ndarray]
    """`sequence_columns` name -> (S,) array."""
    seq_offsets: np.ndarray
    """(S + 1,) int64, from 0 to N."""

    @property
    def num_tokens(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def num_sequences(self) -> int:
        return int(self.seq_offsets.shape[0] - 1)

    def check(self, layout: Layout, encoding: TopkEncoding) -> None:
        """Raise ValueError unless every column has the name, dtype and shape declared."""
        n, s = self.num_tokens, self.num_sequences
        want_tokens = token_columns(layout, encoding)
        if set(self.tokens) != set(want_tokens):
            raise ValueError(
                f"stored token columns {sorted(self.tokens)} differ from the layout's "
                f"{sorted(want_tokens)}"
            )
        for name, col in want_tokens.items():
            value = self.tokens[name]
            if value.dtype != np.dtype(col.dtype) or value.shape != (n, *col.shape):
                raise ValueError(
                    f"{name}: expected {col.dtype}{[n, *col.shape]}, got {value.dtype}{list(value.shape)}"
                )
        want_seq = sequence_columns(layout)
        if set(self.sequences) != set(want_seq):
            raise ValueError(
                f"stored sequence columns {sorted(self.sequences)} differ from the layout's "
                f"{sorted(want_seq)}"
            )
        for name, dtype in want_seq.items():
            value = self.sequences[name]
            if value.dtype != np.dtype(dtype) or value.shape != (s,):
                raise ValueError(
                    f"{name}: expected {dtype}[{s}], got {value.dtype}{list(value.shape)}"
                )
        check_offsets(self.seq_offsets, n)

    def select(self, picked: Sequence[int] | np.ndarray) -> StoredShard:
        """The sequences at positions `picked` (in that order), as their own shard."""
        picked = np.asarray(picked, dtype=np.int64)
        lo, hi = self.seq_offsets[picked], self.seq_offsets[picked + 1]
        lengths = hi - lo
        offsets = np.zeros(len(picked) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Token rows of every picked sequence, in order: lo[i] .. hi[i] - 1 for each i.
        rows = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1])
        return StoredShard(
            tokens={name: v[rows] for name, v in self.tokens.items()},
            sequences={name: v[picked] for name, v in self.sequences.items()},
            seq_offsets=offsets,
        )


def concat_stored(parts: Sequence[StoredShard]) -> StoredShard:
    """Several stored batches of whole sequences, one after another."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    starts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
    offsets = np.concatenate(
        [first.seq_offsets[:1]]
        + [p.seq_offsets[1:] + o for p, o in zip(parts, starts, strict=True)]
    ).astype(np.int64)
    return StoredShard(
        tokens={name: np.concatenate([p.tokens[name] for p in parts]) for name in first.tokens},
        sequences={
            name: np.concatenate([p.sequences[name] for p in parts]) for name in first.sequences
        },
        seq_offsets=offsets,
    )


def check_offsets(offsets: np.ndarray, num_tokens: int) -> None:
    """Raise ValueError unless `offsets` is int64 [S+1], non-decreasing, from 0 to N."""
    if offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(
            f"seq_offsets must be int64 [S+1], got {offsets.dtype}{list(offsets.shape)}"
        )
    if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"seq_offsets must rise from 0 to the {num_tokens} tokens stored "
            f"(got {offsets[0]}..{offsets[-1]}, {'not ' if np.any(np.diff(offsets) < 0) else ''}"
            "non-decreasing)"
        )


def to_stored(records: ShardRecords, layout: Layout, encoding: TopkEncoding) -> StoredShard:
    """`records` encoded and cast to their stored dtypes."""
    out: dict[str, np.ndarray] = {}
    if layout.k:
        out.update(encoding.encode(records.topk_ids, records.topk_logprobs, layout.vocab_size))
    if layout.compact_samples and records.sample_logprobs is not None:
        out.update(encoding.encode_values(records.sample_logprobs, SAMPLE_PREFIX))
    for name, col in token_columns(layout, encoding).items():
        if name in out:
            continue
        value = getattr(records, name)
        if (
            name in _ID_FIELDS
            and value.size
            and (value.min() < 0 or value.max() >= layout.vocab_size)
        ):
            raise ValueError(f"{name} holds ids outside [0, {layout.vocab_size})")
        out[name] = np.ascontiguousarray(value, dtype=col.dtype)
    sequences = {
        name: np.ascontiguousarray(getattr(records, name), dtype=dtype)
        for name, dtype in sequence_columns(layout).items()
    }
    return StoredShard(out, sequences, np.asarray(records.seq_offsets, dtype=np.int64))


def from_stored(stored: StoredShard, layout: Layout, encoding: TopkEncoding) -> ShardRecords:
    """`ShardRecords` from stored columns (the inverse of `to_stored`)."""
    columns: Mapping[str, np.ndarray] = stored.tokens
    if layout.k:
        topk_parts = {name: columns[name] for name in encoding.columns(layout.k, layout.vocab_size)}
        ids, logprobs = encoding.decode(topk_parts)
    else:  # samples only
        ids = np.zeros((stored.num_tokens, 0), np.int32)
        logprobs = np.zeros((stored.num_tokens, 0), np.float32)
    arrays: dict[str, np.ndarray] = {"topk_ids": ids, "topk_logprobs": logprobs}
    for f in layout.fields():
        if f.name in TOPK_FIELDS:
            continue
        if f.name == SAMPLE_VALUES and layout.compact_samples:
            arrays[f.name] = encoding.decode_values(columns, SAMPLE_PREFIX)
            continue
        source = stored.sequences if f.dims[0] == SEQUENCE else columns
        arrays[f.name] = np.asarray(source[f.name]).astype(f.dtype, copy=False)
    return ShardRecords(**arrays, seq_offsets=np.asarray(stored.seq_offsets, dtype=np.int64))
