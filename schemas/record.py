"""Every field a shard holds, declared once: name, decoded dtype, dimensions and meaning.

The Zarr and Arrow layouts, the validators, `ShardRecords` and the docs all derive from
`RECORD_FIELDS`. Dimensions are symbolic: `tokens` (N, the token positions of a shard),
`sequences` (S), `k`, `temperatures` (the extra distillation temperatures named at build time)
and `samples` (the number of draws per position; unique ids padded with count 0). In a cache
with compact samples (`Layout.compact_samples`, format 3.0) only the draws that fell outside the
top-k are listed, ordered by log-probability, with their log-probabilities in the cache's value
encoding.

A field with `needs` is present only in caches with that feature (`Layout.has`): extra
temperatures, samples, and (from format 2.0) content keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    """numpy dtype of the decoded array (what readers hand out)."""
    dims: tuple[str, ...]
    meaning: str
    needs: str | None = None
    """Present only when the cache has this feature: "temperatures", "samples" or
    "content_keys"."""


TOKEN = "tokens"
SEQUENCE = "sequences"

RECORD_FIELDS: tuple[Field, ...] = (
    Field("input_ids", "int32", (TOKEN,), "the input token id at this position"),
    Field("topk_ids", "int32", (TOKEN, "k"), "the teacher's top-k next-token ids, in rank order"),
    Field("topk_logprobs", "float32", (TOKEN, "k"), "teacher log-probabilities at topk_ids"),
    Field("lse", "float32", (TOKEN,), "log-sum-exp of the teacher logits over the full vocabulary"),
    Field(
        "log_tail",
        "float32",
        (TOKEN,),
        "log(1 - sum(top-k probs)), from the exact logits at build time; -inf when k = V",
    ),
    Field(
        "label_logprob",
        "float32",
        (TOKEN,),
        "teacher log-probability of the actual next token; NaN at a sequence's last position",
    ),
    Field(
        "temp_lse",
        "float32",
        (TOKEN, "temperatures"),
        "log-sum-exp of logits / T for each extra temperature T",
        needs="temperatures",
    ),
    Field(
        "sample_ids",
        "int32",
        (TOKEN, "samples"),
        "distinct ids drawn from the teacher at the sampling temperature (padding: count 0); with "
        "compact samples only the ids outside the top-k, by descending log-prob, padding last",
        needs="samples",
    ),
    Field(
        "sample_counts",
        "uint16",
        (TOKEN, "samples"),
        "how many draws gave each sampled id (they add up to num_samples, or with compact "
        "samples to the draws that fell outside the top-k)",
        needs="samples",
    ),
    Field(
        "sample_logprobs",
        "float32",
        (TOKEN, "samples"),
        "teacher log-probabilities (T = 1) at sample_ids (with compact samples stored in the "
        "cache's value encoding, like topk_logprobs)",
        needs="samples",
    ),
    Field("source_row", "int64", (SEQUENCE,), "row of the source dataset this sequence came from"),
    Field(
        "source_start",
        "int64",
        (SEQUENCE,),
        "token offset of this sequence inside its source document (long documents are windowed)",
    ),
    Field(
        "document_hash",
        "uint64",
        (SEQUENCE,),
        "content key of the source document: the first 8 bytes, read as a little-endian uint64, "
        "of BLAKE2b (digest_size=8) over all its token ids as little-endian int32; with "
        "source_start and the sequence length it identifies a window of a document",
        needs="content_keys",
    ),
)
"""All fields; `seq_offsets` (S + 1,) int64 is implied by the sequence structure."""

FIELDS_BY_NAME = {f.name: f for f in RECORD_FIELDS}
TOPK_FIELDS = ("topk_ids", "topk_logprobs")
"""Stored through the cache's TopkEncoding rather than as-is."""


@dataclass(frozen=True)
class Layout:
    """The sizes that turn the symbolic dimensions into shapes, fixed per cache."""

    k: int
    vocab_size: int
    temperatures: tuple[float, ...] = ()
    num_samples: int = 0
    content_keys: bool = False
    """Sequences carry `document_hash` (every build from format 2.0 on; absent in 1.x caches)."""
    compact_samples: bool = False
    """Format 3.0 samples: only the draws outside the top-k (all of them when k = 0), ordered by
    log-probability, their log-probs in the cache's value encoding. False: 2.x samples, every
    draw, ordered by id, float32 log-probs."""

    def to_json(self) -> dict[str, object]:
        """The layout as manifests and shard metadata store it: `compact_samples` appears only
        when set, so 2.x layouts keep their exact JSON."""
        out: dict[str, object] = {
            "k": self.k,
            "vocab_size": self.vocab_size,
            "temperatures": list(self.temperatures),
            "num_samples": self.num_samples,
            "content_keys": self.content_keys,
        }
        if self.compact_samples:
            out["compact_samples"] = True
        return out

    def fields(self) -> tuple[Field, ...]:
        """The fields a shard of this layout holds."""
        return tuple(f for f in RECORD_FIELDS if self.has(f.needs))

    def has(self, feature: str | None) -> bool:
        return (
            feature is None
            or (feature == "temperatures" and bool(self.temperatures))
            or (feature == "samples" and self.num_samples > 0)
            or (feature == "content_keys" and self.content_keys)
        )

    def trailing_shape(self, f: Field) -> tuple[int, ...]:
        sizes = {"k": self.k, "temperatures": len(self.temperatures), "samples": self.num_samples}
        return tuple(sizes[d] for d in f.dims[1:])

    @property
    def id_dtype(self) -> str:
        """The narrowest unsigned dtype that holds every id of this vocabulary on disk."""
        return "uint16" if self.vocab_size <= 2**16 else "uint32"


@dataclass(frozen=True, eq=False)
class ShardRecords:
    """Decoded records of whole sequences, concatenated along the token axis.

    Sequence s spans tokens `seq_offsets[s]:seq_offsets[s + 1]`. Optional fields are None when
    the layout does not have them. Field names and dtypes are those of `RECORD_FIELDS`.
    """

    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    lse: np.ndarray
    log_tail: np.ndarray
    label_logprob: np.ndarray
    source_row: np.ndarray
    source_start: np.ndarray
    seq_offsets: np.ndarray
    temp_lse: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None
    sample_logprobs: np.ndarray | None = None
    document_hash: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.source_row.shape[0])

    def arrays(self) -> Iterator[tuple[Field, np.ndarray]]:
        """(field, array) for every field present, in table order."""
        for f in RECORD_FIELDS:
            value = getattr(self, f.name)
            if value is not None:
                yield f, value

    def check(self, layout: Layout) -> None:
        """Raise ValueError unless every array has the dtype and shape the layout declares."""
        n, s = self.num_tokens, self.num_sequences
        for f in RECORD_FIELDS:
            value = getattr(self, f.name)
            if not layout.has(f.needs):
                if value is not None:
                    raise ValueError(f"{f.name} given but the layout does not hold it")
                continue
            if value is None:
                raise ValueError(f"{f.name} missing: the layout holds it")
            lead = n if f.dims[0] == TOKEN else s
            want = (lead, *layout.trailing_shape(f))
            if value.shape != want or value.dtype != np.dtype(f.dtype):
                raise ValueError(
                    f"{f.name}: expected {f.dtype}{list(want)}, got {value.dtype}{list(value.shape)}"
                )
        offs = self.seq_offsets
        if offs.dtype != np.int64 or offs.shape != (s + 1,) or offs[0] != 0 or offs[-1] != n:
            raise ValueError(f"seq_offsets must be int64 [S+1] from 0 to N={n}, got {offs!r}")
        if np.any(np.diff(offs) < 0):
            raise ValueError("seq_offsets must be non-decreasing")

    def sequences(self, start: int, stop: int) -> ShardRecords:
        """Sequences start..stop (exclusive) as their own records."""
        lo, hi = int(self.seq_offsets[start]), int(self.seq_offsets[stop])
        picked = {}
        for f, value in self.arrays():
            picked[f.name] = value[lo:hi] if f.dims[0] == TOKEN else value[start:stop]
        picked["seq_offsets"] = self.seq_offsets[start : stop + 1] - lo
        return replace(self, **picked)

    def equals(self, other: ShardRecords) -> bool:
        """Bit-for-bit equality of every array (NaN payloads included)."""
        mine = dict(self.arrays()) | {None: self.seq_offsets}
        theirs = dict(other.arrays()) | {None: other.seq_offsets}
        if mine.keys() != theirs.keys():
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in ((mine[key], theirs[key]) for key in mine)
        )


def concat_records(parts: Sequence[ShardRecords]) -> ShardRecords:
    """Records of several batches of whole sequences, one after another."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    joined = {}
    for f, _ in first.arrays():
        joined[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
    starts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
    joined["seq_offsets"] = np.concatenate(
        [parts[0].seq_offsets[:1]]
        + [p.seq_offsets[1:] + o for p, o in zip(parts, starts, strict=False)]
    ).astype(np.int64)
    return replace(first, **joined)


def empty_records(layout: Layout) -> ShardRecords:
    """Records with no sequences (a valid, empty batch)."""
    arrays = {
        f.name: np.zeros((0, *layout.trailing_shape(f)), dtype=f.dtype) for f in layout.fields()
    }
    return ShardRecords(**arrays, seq_offsets=np.zeros(1, dtype=np.int64))


def record_field_names() -> list[str]:
    """Names of `ShardRecords` data fields (for the check that it matches the table)."""
    return [f.name for f in fields(ShardRecords)]


def document_hash(token_ids: np.ndarray) -> int:
    """The content key of a document (see the `document_hash` field): anyone holding the same
    token ids computes the same number, so a cache can be checked against one's own data."""
    digest = hashlib.blake2b(np.asarray(token_ids, dtype="<i4").tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")
