"""Typed, bounded parsing of untrusted JSON into the manifest's frozen dataclasses.

A manifest and its commit records come from whoever made the cache. Every value is checked
against its field's type and bound here, before any arithmetic sees it: a count of 10**400
would otherwise surface far away as an OverflowError, a NaN temperature as a NaN loss, a
free-form block nested 900 levels deep as a RecursionError in the first `json.dumps`, and a
list of ten million temperatures as an allocation. Each refusal is a one-line
`CacheCorruptError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any

from schemas.errors import CacheCorruptError

MAX_COUNT = 2**53 - 1
"""Counts and sizes: exact in a float64, as every JSON reader (DuckDB, JavaScript) holds them."""
MAX_INDEX = 10**9 - 1
"""Shard indices (shard names have six digits; a billion is far beyond any cache)."""
MAX_K = 1 << 20
"""Top-k and samples per position: more than any vocabulary in use."""
MAX_VOCAB = 2**31 - 1
MAX_TEMPERATURE = 1e6
MAX_STR = 1 << 16
"""Characters in any string (names, paths, checksums)."""
MAX_LIST = 100_000
"""Items in a list or object, unless `LIST_BOUNDS` says otherwise."""
MAX_DEPTH = 32
"""Nesting of free-form blocks (the build config, the encoding, extensions)."""

INT_BOUNDS: dict[str, tuple[int, int]] = {
    "k": (0, MAX_K),  # 0: a samples-only cache (checked with the layout)
    "top_k": (0, MAX_K),
    "num_samples": (0, MAX_K),
    "vocab_size": (1, MAX_VOCAB),
    "bos_token_id": (0, MAX_VOCAB),
    "eos_token_id": (0, MAX_VOCAB),
    "pad_token_id": (0, MAX_VOCAB),
    "index": (0, MAX_INDEX),
    "origin_index": (0, MAX_INDEX),
    "seed": (-(2**63), 2**64 - 1),
}
"""Bounds by field name; every other int is a count or size in [0, MAX_COUNT]."""
POSITIVE = frozenset({"temperatures", "sample_temperature"})
"""Float fields that must lie in (0, MAX_TEMPERATURE]; every other float must be finite."""
LIST_BOUNDS: dict[str, int] = {"shards": 1_000_000, "temperatures": 64, "files": 1024}


def decode_json(data: bytes, limit: int, where: str, *, hint: str) -> object:
    """The JSON value in `data`, read with at most `limit` + 1 bytes (`read_bounded`); a
    one-line `CacheCorruptError` naming `where` if there were more, or it is not JSON."""
    if len(data) > limit:
        raise CacheCorruptError(
            f"{where} is larger than {limit >> 20} MiB, the most kdcache reads", hint=hint
        )
    try:  # ValueError: bad JSON, bad UTF-8, an integer of more than 4300 digits
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        text = " ".join(str(exc).split())[:200]
        raise CacheCorruptError(
            f"{where} is not valid JSON ({type(exc).__name__}: {text})", hint=hint
        ) from None


def parse_dataclass(cls: Any, data: object, where: str) -> Any:
    """Build dataclass `cls` from `data`, checking every field's type and bound."""
    name = cls.__name__
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{where}: {name} must be an object, got {show(data)}")
    hints, known = _field_types(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "extensions":
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CacheCorruptError(f"{where}: {name} is missing field {f.name!r}")
            continue
        values[f.name] = coerce(hints[f.name], data[f.name], f"{where}: {name}.{f.name}", f.name)
    extra = set(data) - known
    if extra:
        shown = sorted(show(key) for key in extra)[:5]
        raise CacheCorruptError(f"{where}: {name} has unknown fields {', '.join(shown)}")
    return cls(**values)


@functools.cache
def _field_types(cls: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """(type of each field, field names) of dataclass `cls`, worked out once per class:
    `typing.get_type_hints` evaluates every string annotation anew on each call, which made a
    manifest of 10,000 shards (20,000 small dataclasses) take seconds to open."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def coerce(tp: Any, value: object, where: str, name: str) -> Any:
    """`value` as type `tp` (a field of that `name`), or `CacheCorruptError` naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        errors = []
        for option in options:
            try:
                return coerce(option, value, where, name)
            except CacheCorruptError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where)
    if origin is tuple and isinstance(value, list):
        _check_length(value, where, LIST_BOUNDS.get(name, MAX_LIST))
        item = typing.get_args(tp)[0]
        return tuple(coerce(item, v, where, name) for v in value)
    if origin is dict or tp is dict or tp is Any:
        if tp is Any or isinstance(value, dict):
            check_json(value, where)
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            lo, hi = INT_BOUNDS.get(name, (0, MAX_COUNT))
            if not lo <= value <= hi:
                raise CacheCorruptError(
                    f"{where} must be an integer in [{lo}, {hi}], got {show(value)}"
                )
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _float(value, where, name)
    elif tp is str and isinstance(value, str):
        _check_length(value, where, MAX_STR)
        return value
    raise CacheCorruptError(f"{where} should be {_type_name(tp)}, got {show(value)}")


def _float(value: int | float, where: str, name: str) -> float:
    # An int too large for a float (10**400) is refused here, not met as an OverflowError.
    x = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
    if name in POSITIVE and not 0 < x <= MAX_TEMPERATURE:
        raise CacheCorruptError(
            f"{where} must be a number in (0, {MAX_TEMPERATURE:g}], got {show(value)}"
        )
    if not math.isfinite(x):
        raise CacheCorruptError(f"{where} must be a finite number, got {show(value)}")
    return x


def check_json(value: object, where: str, depth: int = 0) -> None:
    """Refuse free-form JSON that is too deep, too long, or holds a non-finite or huge number
    (such a value could not be written back, and could exhaust the stack of whoever prints it)."""
    if depth > MAX_DEPTH:
        raise CacheCorruptError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        _check_length(value, where, MAX_STR)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise CacheCorruptError(f"{where} holds an out-of-range integer, {show(value)}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CacheCorruptError(f"{where} holds a non-finite number, {show(value)}")
    elif isinstance(value, (list, dict)):
        _check_length(value, where, MAX_LIST)
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            check_json(key, where, depth + 1)
            check_json(item, where, depth + 1)
    else:
        raise CacheCorruptError(f"{where} holds a {type(value).__name__}, which is not JSON")


def _check_length(value: str | list[Any] | dict[str, Any], where: str, limit: int) -> None:
    if len(value) > limit:
        unit = "characters" if isinstance(value, str) else "items"
        raise CacheCorruptError(f"{where} has {len(value)} {unit}, more than the {limit} allowed")


def show(value: object) -> str:
    """A short description of any decoded JSON value, safe to put in a message: never the
    whole of a long string, a deep structure or a thousand-digit number."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        return (
            repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
        )
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)} items"
    return type(value).__name__


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
