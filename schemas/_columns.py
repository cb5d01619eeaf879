"""Records <-> the encoded columns a backend stores (the same for every backend)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from schemas.encodings import Column, TopkEncoding
from schemas.record import FIELDS_BY_NAME, SEQUENCE, TOPK_FIELDS, Layout, ShardRecords

_ID_FIELDS = ("input_ids", "sample_ids")
_SHUFFLE = {"int": "bitshuffle", "uint": "bitshuffle", "float": "shuffle"}


def token_columns(layout: Layout, encoding: TopkEncoding) -> dict[str, Column]:
    """Every stored per-token array: name -> dtype, trailing shape and compression hint."""
    cols: dict[str, Column] = {}
    for f in layout.fields():
        if f.dims[0] == SEQUENCE:
            continue
        if f.name == "topk_ids":
            cols.update(encoding.columns(layout.k, layout.vocab_size))
            continue
        if f.name in TOPK_FIELDS:
            continue
        dtype = layout.id_dtype if f.name in _ID_FIELDS else f.dtype
        kind = np.dtype(dtype).kind
        shuffle = _SHUFFLE["float" if kind == "f" else "int"]
        cols[f.name] = Column(f.name, dtype, layout.trailing_shape(f), shuffle, f.meaning)
    return cols


def sequence_columns() -> dict[str, str]:
    """Stored per-sequence arrays: name -> dtype (the offsets are stored by each backend)."""
    return {f.name: f.dtype for f in FIELDS_BY_NAME.values() if f.dims[0] == SEQUENCE}


def encode(records: ShardRecords, layout: Layout, encoding: TopkEncoding) -> dict[str, np.ndarray]:
    """The per-token columns of `records`, encoded and cast to their stored dtypes."""
    out = dict(encoding.encode(records.topk_ids, records.topk_logprobs, layout.vocab_size))
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
    return out


def decode(
    columns: Mapping[str, np.ndarray],
    sequences: Mapping[str, np.ndarray],
    seq_offsets: np.ndarray,
    layout: Layout,
    encoding: TopkEncoding,
) -> ShardRecords:
    """`ShardRecords` from stored columns (the inverse of `encode`)."""
    topk_parts = {name: columns[name] for name in encoding.columns(layout.k, layout.vocab_size)}
    ids, logprobs = encoding.decode(topk_parts)
    arrays: dict[str, np.ndarray] = {"topk_ids": ids, "topk_logprobs": logprobs}
    for f in layout.fields():
        if f.name in TOPK_FIELDS:
            continue
        source = sequences if f.dims[0] == SEQUENCE else columns
        arrays[f.name] = np.asarray(source[f.name]).astype(f.dtype, copy=False)
    return ShardRecords(**arrays, seq_offsets=np.asarray(seq_offsets, dtype=np.int64))
