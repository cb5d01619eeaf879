"""The kdcache cache contract: manifest, record layout, encodings, readers and writers.

Depends on numpy, pyarrow, zarr, numcodecs and fsspec only, so a notebook can read a cache
without a deep-learning stack:

    >>> from schemas import open_cache
    >>> cache = open_cache("s3://bucket/my-cache")
    >>> records = cache.read_shard(0)        # ShardRecords of numpy arrays
"""

from schemas.cache import BACKENDS, Cache, open_cache
from schemas.derive import DeriveResult, merge_caches, merge_differences, split_cache, subset_cache
from schemas.encodings import TopkEncoding
from schemas.errors import (
    CacheCorruptError,
    CacheNotFoundError,
    ConfigError,
    IncompatibleCacheError,
    KdcacheError,
    StorageError,
)
from schemas.manifest import Manifest, ShardInfo, parse_manifest
from schemas.record import RECORD_FIELDS, Layout, ShardRecords
from schemas.version import FORMAT_VERSION
from schemas.writer import CacheWriter

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "RECORD_FIELDS",
    "Cache",
    "CacheCorruptError",
    "CacheNotFoundError",
    "CacheWriter",
    "ConfigError",
    "DeriveResult",
    "IncompatibleCacheError",
    "KdcacheError",
    "Layout",
    "Manifest",
    "ShardInfo",
    "ShardRecords",
    "StorageError",
    "TopkEncoding",
    "merge_caches",
    "merge_differences",
    "open_cache",
    "parse_manifest",
    "split_cache",
    "subset_cache",
]
