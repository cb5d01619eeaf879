"""The tables of schemas/FORMAT.md, each computed from the code that defines the format.

Sizes are shown as symbols: N token positions and S sequences in a shard, k, T extra
temperatures, samples, and V the vocabulary. Where a stored dtype depends on V or k, the rule
is found by probing `token_columns` / `TopkEncoding.columns` over every size they accept.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from schemas import _arrow, _jsonparse, manifest
from schemas._columns import SAMPLE_PREFIX, sequence_columns, token_columns
from schemas._spec_docs import (
    attribute_docs,
    class_doc,
    field_default,
    pieces,
    rule_text,
    type_text,
)
from schemas.encodings import (
    _QUANTIZERS,
    ID_ENCODINGS,
    VALUE_ENCODINGS,
    Column,
    TopkEncoding,
    default_encoding,
)
from schemas.record import FIELDS_BY_NAME, RECORD_FIELDS, TOPK_FIELDS, Layout

EXAMPLE_LAYOUT = Layout(
    k=4, vocab_size=1000, temperatures=(0.5, 2.0), num_samples=3, content_keys=True
)
"""The layout of the example shards: every optional field, sizes that tell the axes apart."""
_SIZES = {EXAMPLE_LAYOUT.k: "k", len(EXAMPLE_LAYOUT.temperatures): "T", 3: "samples"}
_DIMS = {"tokens": "N", "sequences": "S", "k": "k", "temperatures": "T", "samples": "samples"}
_WIDE = TopkEncoding(ids="uint32", values="float32")
"""An encoding valid for every vocabulary, for probing the columns that do not depend on it."""
_FEATURES = {
    None: "always",
    "temperatures": "`layout.temperatures` is not empty",
    "samples": "`layout.num_samples` > 0",
    "content_keys": "`layout.content_keys` (every 2.0 build)",
}
Row = tuple[str, ...]


def shape_text(dims: tuple[str, ...]) -> str:
    """(N, k) for the dimensions ("tokens", "k")."""
    names = [_DIMS[d] for d in dims]
    return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def record_rows() -> list[Row]:
    """Every field of `RECORD_FIELDS`, decoded, plus the implied sequence offsets."""
    rows = [
        (f"`{f.name}`", f.dtype, shape_text(f.dims), _FEATURES[f.needs], f.meaning)
        for f in RECORD_FIELDS
    ]
    rows.append(
        (
            "`seq_offsets`",
            "int64",
            "(S + 1,)",
            "always",
            "sequence s is token positions seq_offsets[s]:seq_offsets[s + 1], from 0 to N, "
            "non-decreasing",
        )
    )
    return rows


def sequence_rows() -> list[Row]:
    return [
        (f"`{name}`", dtype, FIELDS_BY_NAME[name].meaning)
        for name, dtype in sequence_columns().items()
    ]


def _rule(dtype: Callable[[int, int], str], k0: int) -> str:
    """The stored dtype as a function of V (at k = k0) and of k (at the largest V that works)."""
    by_vocab = pieces(lambda v: dtype(k0, v), k0, _jsonparse.MAX_VOCAB)
    vocab = max(last for _, last, value in by_vocab if value != "refused")
    by_k = pieces(lambda k: dtype(k, vocab), 1, min(_jsonparse.MAX_K, vocab))
    rules = [rule_text(p, s) for p, s in ((by_vocab, "V"), (by_k, "k")) if len(p) > 1]
    return "; ".join(rules) or by_vocab[0][2]


def _probe(columns: Callable[[int, int], dict[str, Column]], name: str) -> Callable[..., str]:
    def dtype(k: int, vocab: int) -> str:
        try:
            return columns(k, vocab)[name].dtype
        except ValueError:
            return "refused"

    return dtype


def _column_row(col: Column, dtype_rule: str, dims: tuple[str, ...]) -> Row:
    return (f"`{col.name}`", dtype_rule, shape_text(dims), col.shuffle, col.meaning)


def token_column_rows() -> list[Row]:
    """Per-token columns stored as they are (not through the top-k encoding)."""
    cols = token_columns(EXAMPLE_LAYOUT, _WIDE)
    rows = []
    for name, col in cols.items():
        if name not in FIELDS_BY_NAME or name in TOPK_FIELDS:
            continue
        probe = _probe(
            lambda k, v: token_columns(dataclasses.replace(EXAMPLE_LAYOUT, vocab_size=v), _WIDE),
            name,
        )
        by_vocab = pieces(lambda v, p=probe: p(EXAMPLE_LAYOUT.k, v), EXAMPLE_LAYOUT.k, 2**31 - 1)
        rows.append(_column_row(col, rule_text(by_vocab, "V"), FIELDS_BY_NAME[name].dims))
    return rows


def _shared_columns(pairs: list[TopkEncoding]) -> list[str]:
    """Names of the columns every encoding of `pairs` stores, in order."""
    k, v = EXAMPLE_LAYOUT.k, EXAMPLE_LAYOUT.vocab_size
    first, *rest = (list(enc.columns(k, v)) for enc in pairs)
    return [name for name in first if all(name in r for r in rest)]


def encoding_rows(kind: str) -> list[Row]:
    """One row per stored column of each id (`kind` "ids") or value ("values") encoding: the
    columns it stores whatever the other half of the encoding is."""
    k, v = EXAMPLE_LAYOUT.k, EXAMPLE_LAYOUT.vocab_size
    rows = []
    for name in ID_ENCODINGS if kind == "ids" else VALUE_ENCODINGS:
        if kind == "ids":
            pairs = [TopkEncoding(name, other) for other in VALUE_ENCODINGS]
            enc = TopkEncoding(name, _WIDE.values)
        else:
            pairs = [TopkEncoding(other, name) for other in ID_ENCODINGS]
            enc = TopkEncoding(_WIDE.ids, name)
        for col_name in _shared_columns(pairs):
            col = enc.columns(k, v)[col_name]
            dims = ("tokens", *(_SIZES[s] for s in col.shape))
            rule = _rule(_probe(enc.columns, col_name), 1)
            rows.append((f"`{name}`", *_column_row(col, rule, dims)))
    return rows


def sample_value_rows() -> list[Row]:
    """The columns that hold compact samples' log-probs, per value encoding (format 3.0)."""
    n = EXAMPLE_LAYOUT.num_samples
    rows = []
    for name in VALUE_ENCODINGS:
        for col in TopkEncoding(_WIDE.ids, name).value_columns(n, SAMPLE_PREFIX).values():
            dims = ("tokens", *("samples" for _ in col.shape))
            rows.append((f"`{name}`", *_column_row(col, col.dtype, dims)))
    return rows


def quantizer_rows() -> list[Row]:
    """Each value encoding's parameters (as every shard's metadata gives them) and bound."""
    rows = []
    for name in VALUE_ENCODINGS:
        enc = TopkEncoding("uint32", name)
        params = enc.describe().get("value_params")
        shown = ", ".join(f"{p}={json.dumps(x)}" for p, x in params.items()) if params else "-"
        reach = f"{_QUANTIZERS[name].range:.4g}" if name in _QUANTIZERS else "-"
        rows.append((f"`{name}`", shown, reach, enc.error_bound()))
    return rows


def default_encodings() -> str:
    """The default encoding by vocabulary size, in words."""
    found = pieces(lambda v: json.dumps(default_encoding(v).to_json()), 1, 2**31 - 1)
    return rule_text(found, "V")


def _arrow_type(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_arrow_type(t.value_type)}>[{_SIZES[t.list_size]}]"
    if pa.types.is_list(t):
        return f"list<{_arrow_type(t.value_type)}>"
    return str(t)


def arrow_rows() -> list[Row]:
    """The Arrow schema of a shard of `EXAMPLE_LAYOUT` in the default encoding."""
    enc = default_encoding(EXAMPLE_LAYOUT.vocab_size)
    schema = _arrow.arrow_schema(EXAMPLE_LAYOUT, enc, {})
    return [(f"`{f.name}`", _arrow_type(f.type)) for f in schema]


def zarr_codecs(arrays: dict[str, dict[str, Any]]) -> tuple[str, dict[str, str]]:
    """The codec chain every array of a Zarr shard shares, and each array's Blosc shuffle.

    `arrays` maps array names to their zarr.json metadata; raises ValueError when the arrays
    differ in anything but the chunk shape, the shuffle and the type size."""
    chains, shuffles, endians = set(), {}, set()
    for name, meta in arrays.items():
        (sharding,) = meta["codecs"]
        config = dict(sharding["configuration"])
        inner = [dict(c) for c in config.pop("codecs")]
        del config["chunk_shape"]
        for codec in inner:
            if codec["name"] == "bytes":  # 1-byte types have no endianness
                endians.add(codec.pop("configuration", {}).get("endian"))
            if codec["name"] == "blosc":
                codec["configuration"] = dict(codec["configuration"])
                shuffles[name] = codec["configuration"].pop("shuffle")
                del codec["configuration"]["typesize"]
        chains.add(json.dumps({"name": sharding["name"], "inner": inner, **config}))
    if len(chains) != 1:
        raise ValueError(f"the arrays of a Zarr shard use different codecs: {sorted(chains)}")
    found = json.loads(chains.pop())
    if len(endians - {None}) > 1:
        raise ValueError(f"the arrays of a Zarr shard use different byte orders: {endians}")
    for codec in found["inner"]:
        if codec["name"] == "bytes" and endians - {None}:
            codec["configuration"] = {"endian": (endians - {None}).pop()}

    def show(codecs: list[dict[str, Any]]) -> str:
        return " -> ".join(
            c["name"] + "(" + ", ".join(f"{k}={v}" for k, v in c.get("configuration", {}).items())
            + ")"
            for c in codecs
        )  # fmt: skip

    return (
        f"{found['name']}: each inner chunk -> {show(found['inner'])}\n"
        f"  (shuffle per array, below; typesize = the dtype's size; 1-byte types: no endian)\n"
        f"  chunk index -> {show(found['index_codecs'])}, at the {found['index_location']}"
    ), shuffles


def _dataclasses_in(tp: object) -> list[type]:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    return [c for arg in typing.get_args(tp) for c in _dataclasses_in(arg)]


def _documented(
    names: list[str], docs: dict[str, str], notes: dict[str, str], where: str
) -> dict[str, str]:
    """Each name's docstring, or its note where the code has none. Raises ValueError for a
    note on a name without one or with a docstring: the code's docstring is the one source."""
    extra = {n for n in notes if n not in names or n in docs}
    if extra:
        raise ValueError(f"notes for {where} {sorted(extra)}: gone, or documented in the code")
    return {n: docs.get(n) or notes.get(n, "") for n in names}


def manifest_tables(notes: dict[str, str]) -> list[tuple[type, str, list[Row]]]:
    """(class, its docstring, one row per field) for `Manifest` and every dataclass it holds,
    in the order they are first met. `notes` ("Class.field": meaning) stand in for attribute
    docstrings the code does not have."""
    found: list[type] = [manifest.Manifest]
    out = []
    used = set()
    for cls in found:  # grows while it is walked
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.name != "extensions"]  # not JSON
        mine = {n.split(".", 1)[1]: t for n, t in notes.items() if n.startswith(cls.__name__ + ".")}
        used |= {f"{cls.__name__}.{n}" for n in mine}
        docs = _documented([f.name for f in fields], attribute_docs(cls), mine, cls.__name__)
        rows = []
        for f in fields:
            found += [c for c in _dataclasses_in(hints[f.name]) if c not in found]
            rows.append((f"`{f.name}`", type_text(hints[f.name]), field_default(f), docs[f.name]))
        out.append((cls, class_doc(cls), rows))
    if set(notes) - used:
        raise ValueError(
            f"notes for classes the manifest does not hold: {sorted(set(notes) - used)}"
        )
    return out


_LIMIT_EXTRAS = ("INT_BOUNDS", "POSITIVE", "LIST_BOUNDS")


def limit_rows(notes: dict[str, str]) -> list[Row]:
    """The bounds a reader holds a manifest and a commit record to (every `MAX_*` constant of
    `schemas.manifest` and `schemas._jsonparse`, and the per-field bounds)."""
    rows = []
    for module in (manifest, _jsonparse):
        names = [n for n in vars(module) if n.startswith("MAX_") or n in _LIMIT_EXTRAS]
        mine = {n: t for n, t in notes.items() if n in vars(module)}
        docs = _documented(names, attribute_docs(module), mine, module.__name__)
        for name in names:
            rows.append((f"`{name}`", _value_text(getattr(module, name)), docs[name]))
    return rows


def _value_text(value: object) -> str:
    if isinstance(value, dict):
        return "; ".join(f"`{k}`: {_value_text(v)}" for k, v in value.items())
    if isinstance(value, frozenset):
        return ", ".join(f"`{v}`" for v in sorted(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:,}" for v in value) + "]"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
