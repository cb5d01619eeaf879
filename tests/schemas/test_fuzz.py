"""Fuzzing what a cache hands its reader: manifest JSON, manifest bytes, shard metadata.

The property everywhere: the reader either accepts the input or raises a `KdcacheError` whose
message is one line. Any other exception (OverflowError, RecursionError, KeyError, a zarr or
pyarrow error) is a bug: a user would see a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cli import _format_inspect
from schemas.cache import open_cache
from schemas.errors import KdcacheError
from schemas.manifest import Manifest, ShardInfo, parse_manifest, to_json
from schemas.stats import describe
from schemas.storage import checksum_file, checksum_tree, resolve
from schemas.validate import validate_cache
from tests.schemas.test_cache import make_cache

pytestmark = pytest.mark.reliability("hostile-cache")

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIELD_NAMES = sorted(
    {f.name for cls in (Manifest, ShardInfo) for f in dataclasses.fields(cls)}
    | {"k", "vocab_size", "ids", "values", "files", "nbytes", "name", "must_understand"}
)
EDGE_VALUES = [10**400, -(10**400), 2**53, 2**63, 2**64, -1, 0, float("nan"), float("inf")]
EDGE_VALUES += ["", "x" * 70_000, "shards/../x", "a\nb", None, True, [], {}]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGE_VALUES)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _accepted_or_one_line(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` with little stack to spare: its result, or None after checking a
    KdcacheError is one line."""
    try:
        return _with_headroom(lambda: fn(*args, **kwargs))
    except KdcacheError as exc:
        assert str(exc).splitlines() == [str(exc)], str(exc)
        return None


HEADROOM = 700
"""Stack frames left to a reader, as when a Trainer callback inside a DataLoader worker calls
it. (Hypothesis raises the recursion limit while a test runs; the frames are used up here so
that a RecursionError a user would meet still shows.)"""


def _with_headroom(fn: Any, headroom: int = HEADROOM) -> Any:
    """`fn()` called under enough frames that only `headroom` are left below the limit.

    Other threads (zarr's event loop) keep their whole stack, as they do for a user."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return _deep(max(0, sys.getrecursionlimit() - depth - headroom), fn)


def _deep(frames: int, fn: Any) -> Any:
    return fn() if frames == 0 else _deep(frames - 1, fn)


def _paths(node: Any) -> list[tuple]:
    """Every key path into a JSON value (the root excluded), none deeper than 50 levels: an
    earlier edit may have buried a value under thousands."""
    out: list[tuple] = []
    stack: list[tuple[Any, tuple]] = [(node, ())]
    while stack:
        value, prefix = stack.pop()
        if isinstance(value, (dict, list)) and len(prefix) < 50:
            for key, child in value.items() if isinstance(value, dict) else enumerate(value):
                out.append((*prefix, key))
                stack.append((child, (*prefix, key)))
    return out


class Doc:
    """A drawn JSON document whose repr stays short however deep it is nested: Hypothesis
    prints a failing example, and a 5000-deep list would crash the printer instead."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        try:
            text = json.dumps(self.value, allow_nan=True)
        except (RecursionError, ValueError):
            text = "<nested too deep to print>"
        return f"Doc({text[:400]}{'...' if len(text) > 400 else ''})"


@st.composite
def mutated(draw: st.DrawFn, base: dict, max_depth: int = 5000) -> Doc:
    """`base` after one to three edits: delete a key, replace a value with random JSON or an
    edge value, or bury a value under deep nesting."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.sampled_from(["delete", "replace", "edge", "nest"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "edge":
            parent[key] = draw(st.sampled_from(EDGE_VALUES))
        else:
            value = parent[key]
            for _ in range(draw(st.sampled_from([2, 40, max_depth]))):
                value = [value]
            parent[key] = value
    return Doc(data)


def _valid_manifest_json() -> dict:
    """A complete manifest with shards and a fidelity block, as JSON."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        make_cache(tmp, "arrow", shards=2)
        return json.loads(Path(tmp, "manifest.json").read_text())


VALID = _valid_manifest_json()


def _check_parsed(data: object) -> None:
    m = _accepted_or_one_line(parse_manifest, data)
    if m is not None:  # what is accepted can be used and written back as it was read
        assert m.fingerprint.startswith("sha256:")
        assert parse_manifest(json.loads(to_json(m))) == m


# -- (a) parse_manifest -------------------------------------------------------------------


@FUZZ
@given(data=json_values)
def test_parse_manifest_on_arbitrary_json(data) -> None:
    _check_parsed(data)


@FUZZ
@given(doc=mutated(VALID))
def test_parse_manifest_on_mutated_valid_manifests(doc: Doc) -> None:
    _check_parsed(doc.value)


# -- (b) a real cache whose manifest.json bytes are fuzzed ----------------------------------


@st.composite
def manifest_bytes(draw: st.DrawFn, base: dict) -> bytes:
    """The bytes of manifest `base`, damaged in one of several ways."""
    text = json.dumps(base, indent=1).encode()
    how = draw(st.sampled_from(["json", "flip", "truncate", "splice", "nest"]))
    if how == "json":  # NaN and Infinity as Python's json writes them
        return json.dumps(draw(mutated(base, max_depth=100)).value).encode()
    if how == "flip":
        data = bytearray(text)
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[pos] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if how == "splice":
        pos = draw(st.integers(0, len(text)))
        return text[:pos] + draw(st.binary(max_size=16)) + text[pos:]
    depth = draw(st.sampled_from([999, 1000, 100_000]))
    return b'{"schema_version": "2.0", "x": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def small_cache(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "c"
    make_cache(str(root), request.param)
    return root


def _open_inspect_validate(root: Path) -> None:
    cache = _accepted_or_one_line(open_cache, str(root))
    if cache is not None:
        info = _accepted_or_one_line(describe, cache)
        if info is not None:
            _format_inspect(info)
            json.dumps(info)
    for problem in _with_headroom(lambda: validate_cache(str(root), deep=True)):
        assert str(problem).splitlines() == [str(problem)], str(problem)


@FUZZ
@given(data=st.data())
def test_open_and_validate_with_fuzzed_manifest_bytes(small_cache: Path, data) -> None:
    path = small_cache / "manifest.json"
    original = path.read_bytes()
    try:
        path.write_bytes(data.draw(manifest_bytes(json.loads(original)), label="manifest"))
        _open_inspect_validate(small_cache)
    finally:
        path.write_bytes(original)


# -- (c) shard metadata -----------------------------------------------------------------------


def _set_shard_metadata(root: Path, fmt: str, value: Any) -> None:
    """Rewrite shard 0's own metadata (JSON text, or a value to write as JSON), then list its
    new size and checksum in the manifest, so the reader gets past the checksum to the
    identity check."""
    fs, _ = resolve(str(root))
    path = root / "shards" / f"000000.{fmt}"
    text = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
    if fmt == "arrow":
        table = pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()
        table = table.replace_schema_metadata({**table.schema.metadata, b"kdcache": text})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        checksum, nbytes = checksum_file(fs, str(path))
    else:
        meta = json.loads((path / "zarr.json").read_text())
        meta.setdefault("attributes", {})["kdcache"] = json.loads(text)
        (path / "zarr.json").write_text(json.dumps(meta, allow_nan=True))
        checksum, nbytes = checksum_tree(fs, str(path))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0].update(checksum=checksum, nbytes=nbytes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


@st.composite
def shard_metadata(draw: st.DrawFn, identity: dict) -> str:
    """The text of a shard's metadata: random, close to the truth, or buried deep."""
    how = draw(st.sampled_from(["json", "mutated", "buried", "text"]))
    if how == "json":
        return json.dumps(draw(json_values), allow_nan=True)
    if how == "mutated":  # close to the truth, so the comparison goes deep
        return json.dumps(draw(mutated(identity, max_depth=300)).value, allow_nan=True)
    if how == "buried":  # one checked value under nesting a printer cannot follow
        value: Any = draw(json_values)
        for _ in range(draw(st.sampled_from([100, 900]))):
            value = [value]
        return json.dumps({**identity, draw(st.sampled_from(sorted(identity))): value})
    return draw(st.sampled_from(["", "{", "[1,", "NaN", "null"]) | st.text(max_size=20))


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_fuzzed_shard_metadata(tmp_path_factory, fmt) -> None:
    root = tmp_path_factory.mktemp(f"meta-{fmt}") / "c"
    make_cache(str(root), fmt, shards=2)
    identity = open_cache(str(root)).reader(0).identity()
    pristine = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    @FUZZ
    @given(text=shard_metadata(identity))
    def check(text: str) -> None:
        for path, data in pristine.items():
            path.write_bytes(data)
        if fmt == "zarr" and _json_or_none(text) is None:
            text = json.dumps({"not json": text})  # zarr.json itself must stay JSON
        _set_shard_metadata(root, fmt, text)
        cache = open_cache(str(root))
        if _accepted_or_one_line(cache.reader, 0) is not None:  # only when it says the truth
            found = _json_or_none(text)
            expected = cache.expected_identity(cache.shards[0])
            assert isinstance(found, dict)
            assert all(found.get(k) == v for k, v in expected.items())
        _accepted_or_one_line(cache.read_shard, 0)
        for problem in _with_headroom(lambda: validate_cache(str(root), deep=True)):
            assert str(problem).splitlines() == [str(problem)], str(problem)

    check()
