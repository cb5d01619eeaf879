"""The manifest: what a cache is, how it was made, and which shards are committed.

`Manifest` is a frozen dataclass; `ManifestJSON` is its JSON shape. `parse_manifest` trusts
nothing: every field is checked by a small parser that raises `CacheCorruptError` naming the
field, and a newer major schema version is refused by name. Unknown top-level fields are
rejected unless they are objects that say `"must_understand": false`. A cache is untrusted
input, so every number, string, list and free-form block is also bounded
(`schemas._jsonparse`), and so is the size of the manifest itself (`MAX_MANIFEST_BYTES`).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import typing
from dataclasses import dataclass, field
from typing import Any, TypedDict

from schemas._jsonparse import check_json, parse_dataclass, show
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, ConfigError
from schemas.fidelity import Fidelity, ShardFidelity
from schemas.fingerprint import config_fingerprint
from schemas.record import Layout
from schemas.version import FORMAT_VERSION, SAMPLES_MAJOR, check_readable, parse_version

FORMATS = ("zarr", "arrow")
STATUSES = ("building", "complete")
SHARD_DIR = "shards"

MAX_MANIFEST_BYTES = 64 << 20
"""The largest manifest.json kdcache reads or writes: about 90,000 shards (a few hundred
bytes each); a cache that needs more should use larger shards (--shard-tokens)."""
MAX_COMMIT_BYTES = 1 << 20
"""The largest commit record (one `ShardInfo`, well under a kilobyte when honest)."""
MAX_TOKENIZER_FILE_BYTES = 256 << 20
MAX_TOKENIZER_BYTES = 1 << 30
"""Bounds on the declared sizes of the `tokenizer/` copy, which is read into memory."""


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
        layout = self.layout.to_json()
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
    """The manifest's JSON text; `ConfigError` if readers would refuse it as too large."""
    data = dataclasses.asdict(manifest)
    data["layout"] = manifest.layout.to_json()
    data.update(data.pop("extensions"))
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    if len(text) > MAX_MANIFEST_BYTES:  # characters are bytes: json.dumps escapes non-ASCII
        raise ConfigError(
            f"the manifest of {len(manifest.shards)} shards would be {len(text) >> 20} MiB, "
            f"more than the {MAX_MANIFEST_BYTES >> 20} MiB a reader accepts",
            hint="build with a larger --shard-tokens, so that fewer shards hold the tokens",
        )
    return text


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
                f"{where} has field {show(key)} this kdcache does not understand",
                hint="upgrade kdcache, or mark the field with must_understand: false",
            )
        check_json(value, f"{where}: {show(key)}")
    manifest = parse_dataclass(Manifest, {k: v for k, v in data.items() if k in known}, where)
    manifest = dataclasses.replace(manifest, extensions=extensions)
    _check_manifest(manifest, where)
    return manifest


def parse_shard_info(data: object, where: str) -> ShardInfo:
    """A `ShardInfo` from decoded JSON (a commit record), checked like a manifest's entries."""
    info = parse_dataclass(ShardInfo, data, where)
    check_shard_name(info.name, where)
    return info


def _check_manifest(m: Manifest, where: str) -> None:
    """What the field parsers cannot see alone: choices, and fields that must agree."""
    if m.format not in FORMATS:
        raise CacheCorruptError(f"{where}: format {show(m.format)} is not one of {FORMATS}")
    if m.status not in STATUSES:
        raise CacheCorruptError(f"{where}: status {show(m.status)} is not one of {STATUSES}")
    layout = m.layout
    if layout.vocab_size < layout.k or (layout.k == 0 and not layout.num_samples):
        raise CacheCorruptError(
            f"{where}: layout needs 1 <= k <= vocab_size (or k = 0 with samples), got {layout}"
        )
    major = parse_version(m.schema_version)[0]
    if (layout.compact_samples or layout.k == 0) and major < SAMPLES_MAJOR:
        raise CacheCorruptError(
            f"{where}: compact samples or k = 0 need schema_version {SAMPLES_MAJOR}.0 or newer, "
            f"and the manifest says {m.schema_version}"
        )
    if layout.k == 0 and not layout.compact_samples:
        raise CacheCorruptError(f"{where}: a cache without top-k (k = 0) stores compact samples")
    try:  # an unknown name, or ids too narrow for the vocabulary
        TopkEncoding.from_json(m.encoding).columns(max(layout.k, 1), layout.vocab_size)
    except (ValueError, TypeError) as exc:
        raise CacheCorruptError(
            f"{where}: encoding {show(m.encoding)} does not work here: {' '.join(str(exc).split())[:300]}",
            hint="upgrade kdcache if a newer one made the cache; otherwise restore the manifest from its producer",
        ) from None
    seen = set()
    for shard in m.shards:
        check_shard_name(shard.name, where)
        if shard.index in seen:
            raise CacheCorruptError(f"{where}: shard index {shard.index} is listed twice")
        seen.add(shard.index)
    _check_tokenizer_files(m.tokenizer.files, where)


def _check_tokenizer_files(files: tuple[FileInfo, ...], where: str) -> None:
    """Plain, distinct file names (they are joined to folders on read and on copy) and
    declared sizes small enough to hold in memory."""
    names = [f.name for f in files]
    for name in names:
        if (
            not name
            or len(name) > 255
            or name in (".", "..")
            or any(c in name for c in "/\\:")
            or not name.isprintable()
        ):
            raise CacheCorruptError(
                f"{where} lists tokenizer file {show(name)}, which is not a plain file name",
                hint="the manifest was edited or forged; restore it from the cache's producer",
            )
    if len(set(names)) != len(names):
        raise CacheCorruptError(f"{where} lists a tokenizer file twice")
    big = [f for f in files if f.nbytes > MAX_TOKENIZER_FILE_BYTES]
    if big or sum(f.nbytes for f in files) > MAX_TOKENIZER_BYTES:
        raise CacheCorruptError(
            f"{where} declares a tokenizer copy larger than kdcache reads "
            f"({MAX_TOKENIZER_FILE_BYTES >> 20} MiB a file, {MAX_TOKENIZER_BYTES >> 20} MiB in all)",
            hint="the manifest was edited or forged; restore it, or pass --tokenizer PATH",
        )


def check_shard_name(name: str, where: str) -> None:
    """Refuse shard paths that could point outside the cache root."""
    norm = posixpath.normpath(name)
    if (
        not name
        or not name.isprintable()
        or "\\" in name
        or name.startswith("/")
        or ":" in name
        or norm != name
        or not norm.startswith(SHARD_DIR + "/")
        or ".." in norm.split("/")
    ):
        raise CacheCorruptError(
            f"{where} lists shard path {show(name)}, which is not inside the cache's {SHARD_DIR}/",
            hint="shard paths must be relative, like 'shards/000000.arrow'; the manifest was edited or forged",
        )
