"""Small tools `schemas.spec` builds FORMAT.md with: docstrings read from source, Markdown
tables, JSON type names, and rules found by probing a function of one size."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


def _body(obj: type | types.ModuleType) -> list[ast.stmt]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    if inspect.ismodule(obj):
        return tree.body
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        raise TypeError(f"{obj!r} is not a class")
    return node.body


def attribute_docs(obj: type | types.ModuleType) -> dict[str, str]:
    """Attribute docstrings of a class or module: the string right after `name: T = ...` or
    `NAME = ...` (the convention of PEP 257 that Sphinx and mkdocstrings read)."""
    body = _body(obj)
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if not (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            continue
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            docs[node.targets[0].id] = inspect.cleandoc(after.value.value)
    return docs


def class_doc(cls: type) -> str:
    """The docstring written in the class body ("" when none; not the signature that
    `dataclass` puts in `__doc__`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    node = tree.body[0]
    return (ast.get_docstring(node) or "") if isinstance(node, ast.ClassDef) else ""


def one_line(text: str) -> str:
    """`text` as one table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(one_line(str(cell)) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def anchor(heading: str) -> str:
    """The link target GitHub gives a heading."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return "#" + kept.replace(" ", "-")


_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Any: "any JSON",
}


def type_text(tp: Any) -> str:
    """The JSON shape of a dataclass field's type, e.g. "array of number" or "string or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in options)
        return text + " or null" if len(options) < len(args) else text
    if origin is tuple:
        return f"array of {type_text(args[0])}"
    if origin is dict or tp is dict:
        return "object"
    if dataclasses.is_dataclass(tp):
        return f"object ([{tp.__name__}]({anchor(tp.__name__)}))"
    return _SCALARS[tp]


def field_default(f: dataclasses.Field[Any]) -> str:
    """A dataclass field's default as JSON text, or "required"."""
    if f.default is not dataclasses.MISSING:
        return json.dumps(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return json.dumps(f.default_factory())
    return "required"


def pieces(fn: Callable[[int], str], lo: int, hi: int) -> list[tuple[int, int, str]]:
    """Ranges (first, last, value) of x in [lo, hi] over which `fn(x)` is constant, found by
    bisection (`fn` must be piecewise constant, each value on one interval)."""
    cache: dict[int, str] = {}

    def f(x: int) -> str:
        if x not in cache:
            cache[x] = fn(x)
        return cache[x]

    def split(a: int, b: int) -> list[int]:  # the x in (a, b] where f(x) != f(x - 1)
        if f(a) == f(b):
            return []
        if b == a + 1:
            return [b]
        mid = (a + b) // 2
        return split(a, mid) + split(mid, b)

    starts = [lo, *split(lo, hi)]
    ends = [s - 1 for s in starts[1:]] + [hi]
    return [(s, e, f(s)) for s, e in zip(starts, ends, strict=True)]


def rule_text(found: list[tuple[int, int, str]], symbol: str) -> str:
    """`pieces` in words: "uint16 if V <= 65,536, uint32 if V > 65,536"."""
    if len(found) == 1:
        return found[0][2]
    parts = []
    for i, (first, last, value) in enumerate(found):
        if i == 0:
            parts.append(f"{value} if {symbol} ≤ {last:,}")
        elif i == len(found) - 1:
            parts.append(f"{value} if {symbol} > {first - 1:,}")
        else:
            parts.append(f"{value} if {first:,} ≤ {symbol} ≤ {last:,}")
    return ", ".join(parts)


def fenced(code: str, lang: str = "python") -> str:
    """A fenced Markdown code block."""
    return f"```{lang}\n{code.rstrip()}\n```"
