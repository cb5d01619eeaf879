"""kdcache: run the teacher once, cache its top-k distribution, distil many students from it.

The public API mirrors the command line:

    kdcache.build(kdcache.BuildConfig(teacher=..., dataset=..., out=...))   # stage one
    kdcache.train(kdcache.TrainConfig(cache=..., student=..., out=...))     # stage two
    kdcache.open_cache(url)                                                  # read a cache (numpy only)

The stages are imported on first use, so `import kdcache` (and `kdcache --help`) stays light.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from schemas import open_cache

try:
    __version__ = version("kdcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

_LAZY = {
    "build": "cache_builder",
    "BuildConfig": "cache_builder",
    "train": "student_trainer",
    "TrainConfig": "student_trainer",
    "LOSSES": "student_trainer",
}

__all__ = ["LOSSES", "BuildConfig", "TrainConfig", "__version__", "build", "open_cache", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
