"""One error hierarchy. Every message says what went wrong, where, and how to fix it.

Only the CLI turns these into one-line messages with a non-zero exit; library users catch
`KdcacheError` (or the matching builtin: a missing cache is also a `FileNotFoundError`).
"""

from __future__ import annotations


class KdcacheError(Exception):
    """Base class. `hint` is the fix, printed after the message."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}. Fix: {hint}" if hint else message)


class CacheNotFoundError(KdcacheError, FileNotFoundError):
    """The cache, its manifest, or a listed shard does not exist."""


class CacheCorruptError(KdcacheError):
    """The cache exists but its manifest or a shard does not hold what it claims."""


class IncompatibleCacheError(KdcacheError):
    """A valid cache that this reader, student or build may not use (version, tokenizer, settings)."""


class ConfigError(KdcacheError, ValueError):
    """A setting is invalid; the message names the --flag."""
