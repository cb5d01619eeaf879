"""The cache format version and the rule for who may read what.

`major.minor`: a reader reads every cache of its own major version (a newer minor only adds
fields marked `must_understand: false`) and refuses a newer major version by name.
"""

from __future__ import annotations

from schemas.errors import IncompatibleCacheError

FORMAT_VERSION = "1.0"
"""Bump the minor for additions old readers may ignore, the major for anything else."""


def parse_version(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"schema_version must look like '1.0', got {text!r}")
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
    if major < ours:
        raise IncompatibleCacheError(
            f"{where} has schema_version {version}, older than this kdcache reads ({FORMAT_VERSION})",
            hint="rebuild the cache with this kdcache, or read it with the kdcache that made it",
        )
