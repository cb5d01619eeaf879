"""The manifest: what a cache is, how it was made, and which shards are committed.

`Manifest` is a frozen dataclass; `ManifestJSON` is its JSON shape. `parse_manifest` trusts
nothing: every field is checked by a small parser that raises `CacheCorruptError` naming the
field, and a newer major schema version is refused by name. Unknown top-level fields are
rejected unless they are objects that say `"must_understand": false`.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypedDict

from schemas.errors import CacheCorruptError
from schemas.fidelity import Fidelity, ShardFidelity
from schemas.fingerprint import config_fingerprint
from schemas.record import Layout
from schemas.version import FORMAT_VERSION, check_readable

FORMATS = ("zarr", "arrow")
STATUSES = ("building", "complete")
SHARD_DIR = "shards"


@dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    name_or_path: str
    revision: str | None = None
    weights_sha256: str | None = None
    """Hash of the weight files, so "the same teacher" is checkable, not a matter of names."""
    model_type: str | None = None
    dtype: str = "float32"
    num_parameters: int | None = None


@dataclass(frozen=True, kw_only=True)
class FileInfo:
    """One file of the cache's `tokenizer/` copy."""

    name: str
    """The file name inside `tokenizer/` (no directories)."""
    nbytes: int
    checksum: str
    """`sha256:<hex>` of the file's bytes."""


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    name_or_path: str
    fingerprint: str
    """`schemas.fingerprint.tokenizer_fingerprint`: equal fingerprints give equal token ids."""
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    files: tuple[FileInfo, ...] = ()
    """The files of `tokenizer/`, checksummed (empty in 1.x caches: not checked)."""


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    source: str
    split: str | None = None
    text_field: str | None = None
    fingerprint: str
    """Hash of the token stream (documents in order with their source rows)."""
    num_documents: int
    num_tokens: int


@dataclass(frozen=True, kw_only=True)
class BuildSettings:
    top_k: int
    max_length: int
    packing: str = "block-diagonal"
    num_samples: int = 0
    sample_temperature: float = 1.0
    temperatures: tuple[float, ...] = ()
    dtype: str = "float32"
    seed: int = 0
    shard_tokens: int = 1 << 20
    config: dict[str, Any] = field(default_factory=dict)
    """The full resolved build configuration (`dataclasses.asdict(BuildConfig)`)."""


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    name: str
    """Path of the shard relative to the cache root, e.g. `shards/000003.arrow`."""
    index: int
    num_tokens: int
    num_sequences: int
    nbytes: int
    checksum: str
    """`sha256:<hex>` of the file (Arrow) or of the group's files in path order (Zarr)."""
    origin: str | None = None
    """Fingerprint of the cache this shard was written for, when that is not this cache (a
    shard that `kdcache merge`, `split` or `subset` took over unchanged); the shard's own
    metadata must name it."""
    origin_index: int | None = None
    """The shard's index in the `origin` cache (its metadata names that one)."""
    fidelity: ShardFidelity | None = None
    """Sums measured from the exact values while the shard was written (None: not measured)."""


@dataclass(frozen=True, kw_only=True)
class SourceCache:
    """A cache another one was derived from."""

    url: str
    """Where it was (credentials removed)."""
    fingerprint: str
    dataset_fingerprint: str


@dataclass(frozen=True, kw_only=True)
class Derivation:
    """How a cache was made from others by `kdcache merge`, `split` or `subset`."""

    operation: str
    sources: tuple[SourceCache, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    schema_version: str = FORMAT_VERSION
    format: str
    status: str = "building"
    created_by: str = "kdcache"
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo
    build: BuildSettings
    layout: Layout
    encoding: dict[str, Any]
    """`TopkEncoding.to_json()`: how topk_ids and topk_logprobs are stored."""
    fidelity: Fidelity | None = None
    """What the teacher's top-k covers and what the encoding loses (`schemas.fidelity`)."""
    derived: Derivation | None = None
    """Set on caches made from other caches (merge, split, subset)."""
    shards: tuple[ShardInfo, ...] = ()
    extensions: dict[str, Any] = field(default_factory=dict)
    """Unknown fields kept from a newer minor version (each has `must_understand: false`)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_sequences(self) -> int:
        return sum(s.num_sequences for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """What the cache's content depends on: equal fingerprints, interchangeable caches."""
        # Names and paths are left out where a hash already identifies the thing: the same
        # teacher weights, vocabulary and token stream make the same cache wherever they live.
        teacher = dataclasses.asdict(self.teacher)
        if teacher["weights_sha256"]:
            teacher.pop("name_or_path")
        tokenizer = dataclasses.asdict(self.tokenizer)
        tokenizer.pop("name_or_path")
        tokenizer.pop("files")  # the bytes save_pretrained writes vary with library versions
        dataset = dataclasses.asdict(self.dataset)
        dataset.pop("source")
        layout = dataclasses.asdict(self.layout)
        if not layout["content_keys"]:  # added in 2.0: 1.x caches keep their fingerprints
            layout.pop("content_keys")
        return config_fingerprint(
            {
                "format": self.format,
                "teacher": teacher,
                "tokenizer": tokenizer,
                "dataset": dataset,
                "build": {k: v for k, v in dataclasses.asdict(self.build).items() if k != "config"},
                "layout": layout,
                "encoding": self.encoding,
            }
        )

    def with_shards(
        self, shards: typing.Iterable[ShardInfo], status: str | None = None
    ) -> Manifest:
        ordered = tuple(sorted(shards, key=lambda s: s.index))
        return dataclasses.replace(self, shards=ordered, status=status or self.status)


class ManifestJSON(TypedDict):
    schema_version: str
    format: str
    status: str
    created_by: str
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    dataset: dict[str, Any]
    build: dict[str, Any]
    layout: dict[str, Any]
    encoding: dict[str, Any]
    fidelity: dict[str, Any] | None
    derived: dict[str, Any] | None
    shards: list[dict[str, Any]]


def to_json(manifest: Manifest) -> str:
    data = dataclasses.asdict(manifest)
    data.update(data.pop("extensions"))
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def parse_manifest(data: object, where: str = "manifest.json") -> Manifest:
    """A `Manifest` from decoded JSON, or a specific error naming the field and `where`."""
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{where} is not a JSON object", hint="rebuild the cache")
    version = data.get("schema_version")
    if not isinstance(version, str):
        raise CacheCorruptError(f"{where} has no schema_version", hint="is this a kdcache cache?")
    try:
        check_readable(version, where)
    except ValueError as exc:
        raise CacheCorruptError(f"{where}: {exc}", hint="rebuild the cache") from None
    known = {f.name for f in dataclasses.fields(Manifest)} - {"extensions"}
    extensions = {}
    for key, value in data.items():
        if key in known:
            continue
        if isinstance(value, dict) and value.get("must_understand") is False:
            extensions[key] = value
        else:
            raise CacheCorruptError(
                f"{where} has field {key!r} this kdcache does not understand",
                hint="upgrade kdcache, or mark the field with must_understand: false",
            )
    manifest = _parse(Manifest, {k: v for k, v in data.items() if k in known}, where)
    manifest = dataclasses.replace(manifest, extensions=extensions)
    _check_manifest(manifest, where)
    return manifest


def parse_shard_info(data: object, where: str) -> ShardInfo:
    """A `ShardInfo` from decoded JSON (a commit record), checked like a manifest's entries."""
    info = _parse(ShardInfo, data, where)
    check_shard_name(info.name, where)
    return info


def _check_manifest(m: Manifest, where: str) -> None:
    if m.format not in FORMATS:
        raise CacheCorruptError(f"{where}: format {m.format!r} is not one of {FORMATS}")
    if m.status not in STATUSES:
        raise CacheCorruptError(f"{where}: status {m.status!r} is not one of {STATUSES}")
    if m.layout.k < 1 or m.layout.vocab_size < m.layout.k:
        raise CacheCorruptError(f"{where}: layout needs 1 <= k <= vocab_size, got {m.layout}")
    seen = set()
    for shard in m.shards:
        check_shard_name(shard.name, where)
        if shard.index in seen:
            raise CacheCorruptError(f"{where}: shard index {shard.index} is listed twice")
        seen.add(shard.index)
        if min(shard.num_tokens, shard.num_sequences, shard.nbytes) < 0:
            raise CacheCorruptError(f"{where}: shard {shard.name} has negative counts")


def check_shard_name(name: str, where: str) -> None:
    """Refuse shard paths that could point outside the cache root."""
    norm = posixpath.normpath(name)
    if (
        not name
        or "\\" in name
        or name.startswith("/")
        or ":" in name
        or norm != name
        or not norm.startswith(SHARD_DIR + "/")
        or ".." in norm.split("/")
    ):
        raise CacheCorruptError(
            f"{where} lists shard path {name!r}, which is not inside the cache's {SHARD_DIR}/",
            hint="shard paths must be relative, like 'shards/000000.arrow'; the manifest was edited or forged",
        )


def _parse(cls: Any, data: object, where: str) -> Any:
    """Build dataclass `cls` from `data`, checking every field's type."""
    name = cls.__name__
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{where}: {name} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "extensions":
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CacheCorruptError(f"{where}: {name} is missing field {f.name!r}")
            continue
        values[f.name] = _coerce(hints[f.name], data[f.name], f"{where}: {name}.{f.name}")
    extra = set(data) - {f.name for f in dataclasses.fields(cls)}
    if extra:
        raise CacheCorruptError(f"{where}: {name} has unknown fields {sorted(extra)}")
    return cls(**values)


def _coerce(tp: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except CacheCorruptError as exc:
                errors.append(exc)
        raise errors[-1]
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        return _parse(tp, value, where)
    elif origin is tuple and isinstance(value, list):
        item = typing.get_args(tp)[0]
        return tuple(_coerce(item, v, where) for v in value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise CacheCorruptError(f"{where} should be {_type_name(tp)}, got {value!r:.60}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
