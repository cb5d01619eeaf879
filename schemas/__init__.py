"""The kdcache cache contract: manifest, record layout, encodings, readers and writers.

Depends on numpy, pyarrow, zarr, numcodecs and fsspec only, so a notebook can read a cache
without a deep-learning stack:

    >>> from schemas import open_cache
    >>> cache = open_cache("s3://bucket/my-cache")
    >>> records = cache.read_shard(0)        # ShardRecords of numpy arrays
"""

from schemas.cache import BACKENDS, Cache, CacheWriter, open_cache
from schemas.encodings import TopkEncoding
from schemas.errors import (
    CacheCorruptError,
    CacheNotFoundError,
    ConfigError,
    IncompatibleCacheError,
    KdcacheError,
)
from schemas.manifest import Manifest, ShardInfo, parse_manifest
from schemas.record import RECORD_FIELDS, Layout, ShardRecords
from schemas.version import FORMAT_VERSION

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "RECORD_FIELDS",
    "Cache",
    "CacheCorruptError",
    "CacheNotFoundError",
    "CacheWriter",
    "ConfigError",
    "IncompatibleCacheError",
    "KdcacheError",
    "Layout",
    "Manifest",
    "ShardInfo",
    "ShardRecords",
    "TopkEncoding",
    "open_cache",
    "parse_manifest",
]
