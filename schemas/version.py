"""The cache format version and the rule for who may read what.

`major.minor`. A reader reads every cache of its own major version (a newer minor only adds
fields marked `must_understand: false`) and of the older majors in `READABLE_MAJORS`, whose
missing features it knows to be absent; it refuses a newer major version by name. Every change
is logged in CHANGELOG.md.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version

from schemas.errors import IncompatibleCacheError

FORMAT_VERSION = "3.0"
"""The newest version this kdcache writes. Bump the minor for additions old readers may ignore,
the major for anything else."""

READABLE_MAJORS = (1, 2, 3)
"""1.x caches lack content keys, shard layout metadata, fidelity and tokenizer checksums; 2.x
caches store samples the 2.0 way (every draw, float32 log-probs)."""

SAMPLES_MAJOR = 3
"""The first major with compact samples (`Layout.compact_samples`, and samples-only caches)."""


def version_for(compact_samples: bool) -> str:
    """The version a new cache records: the oldest that describes it. Only compact samples
    need 3.0, so a cache without samples stays readable by a 2.0 reader."""
    return FORMAT_VERSION if compact_samples else "2.0"


def parse_version(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    if not (major.isdigit() and minor.isdigit() and len(major) <= 6 and len(minor) <= 6):
        raise ValueError(f"schema_version must look like '2.0', got {str(text)[:40]!r}")
    return int(major), int(minor)


def check_readable(version: str, where: str) -> None:
    """Raise `IncompatibleCacheError` when this reader cannot read a cache of `version`."""
    major, _ = parse_version(version)
    ours, _ = parse_version(FORMAT_VERSION)
    if major > ours:
        raise IncompatibleCacheError(
            f"{where} has schema_version {version}, newer than this kdcache reads ({FORMAT_VERSION})",
            hint="upgrade kdcache (pip install -U kdcache) to read it",
        )
    if major not in READABLE_MAJORS:
        raise IncompatibleCacheError(
            f"{where} has schema_version {version}, older than this kdcache reads ({FORMAT_VERSION})",
            hint="rebuild the cache with this kdcache, or read it with the kdcache that made it",
        )


def producer() -> str:
    """What a manifest's `created_by` says: this package and its version."""
    try:
        return f"kdcache {_package_version('kdcache')}"
    except PackageNotFoundError:  # a source tree that was never installed
        return "kdcache (source tree)"
