"""kdcache: run the teacher once, cache its top-k distribution, distil many students from it.

The public API mirrors the command line: `build` (stage one), `train` (stage two) and
`open_cache` (read a cache with numpy only).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from schemas import open_cache

try:
    __version__ = version("kdcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__", "open_cache"]
