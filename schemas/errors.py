"""One error hierarchy. Every message says what went wrong, where, and how to fix it.

Only the CLI turns these into one-line messages with a non-zero exit; library users catch
`KdcacheError` (or the matching builtin: a missing cache is also a `FileNotFoundError`).

A cache is untrusted input, and its paths, names and values end up inside these messages. So
the base class escapes every line break it is given: whatever a forged manifest holds, an
error is one line, and a terminal or a log parser never sees a second, made-up one.
"""

from __future__ import annotations

# Every character `str.splitlines` breaks at, mapped to a visible escape.
_LINE_BREAKS = {
    ord(c): c.encode("unicode_escape").decode("ascii")
    for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
}


def one_line(text: str) -> str:
    """`text` with every line break escaped (`\\n`, `\\u2028`, ...)."""
    return str(text).translate(_LINE_BREAKS)


class KdcacheError(Exception):
    """Base class. `hint` is the fix, printed after the message."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = one_line(message)
        self.hint = one_line(hint) if hint else hint
        super().__init__(f"{self.message}. Fix: {self.hint}" if self.hint else self.message)


class CacheNotFoundError(KdcacheError, FileNotFoundError):
    """The cache, its manifest, or a listed shard does not exist."""


class CacheCorruptError(KdcacheError):
    """The cache exists but its manifest or a shard does not hold what it claims."""


class IncompatibleCacheError(KdcacheError):
    """A valid cache that this reader, student or build may not use (version, tokenizer, settings)."""


class ConfigError(KdcacheError, ValueError):
    """A setting is invalid; the message names the --flag."""


class StorageError(KdcacheError):
    """The storage under a cache failed: an endpoint that is down, a refused permission, a
    network or disk error. The message names the URL; the cause is chained."""
