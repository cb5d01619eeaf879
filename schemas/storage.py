"""Where caches live: local paths and fsspec URLs, atomic writes and checksums.

A cache is untrusted input. On a local filesystem every read goes through the guards of
`schemas._localfs`: no symbolic link is followed below the cache root (a shard linked to /dev/zero would hang a
reader, one linked to ~/.ssh/id_rsa would be read), no device, fifo or socket is opened, and
no read goes past the size the manifest declares. Object stores and memory:// have no links;
there the declared sizes still bound every read.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import posixpath
import re
import sys
import uuid
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem

from schemas._durable import sync_folder
from schemas._localfs import check_inside, check_local_tree, local_files, open_regular
from schemas._retry import retrying
from schemas.errors import (
    CacheCorruptError,
    CacheNotFoundError,
    ConfigError,
    KdcacheError,
    StorageError,
)

_BLOCK = 1 << 22
_FIX_SIZE = (
    "restore it from the cache's producer, or delete the shard and re-run the build to rewrite it"
)
_SHOWN_SCHEMES = ("file", "memory", "s3", "gs", "az", "hf", "http", "https")
"""The schemes an unknown-scheme error names (fsspec knows some fifty)."""


def resolve(url: str, **storage_options: object) -> tuple[AbstractFileSystem, str]:
    """(filesystem, root path) for a local path or an fsspec URL (file://, s3://, memory://).

    Raises `ConfigError` for a scheme fsspec does not know, one whose package is missing, and
    storage options the filesystem does not take; `StorageError` when creating it fails.
    """
    check_url(url)
    with storage_errors(url, "opening"):
        try:
            fs, root = fsspec.core.url_to_fs(str(url), **storage_options)
        except (TypeError, ValueError) as exc:  # a URL or options its filesystem refuses
            raise ConfigError(
                f"cannot open {shown(url)} with these storage options ({_brief(exc)})",
                hint="check the URL, and each --storage-option KEY against the filesystem's documentation",
            ) from exc
    return fs, root.rstrip("/") or "/"


def check_url(url: str, option: str = "the cache URL") -> None:
    """Raise `ConfigError` naming `option` unless fsspec can open `url`'s scheme here.

    Cheap (no filesystem is created), so commands call it before any slow work.
    """
    for part in str(url).split("::"):  # fsspec chains: simplecache::s3://...
        protocol = fsspec.core.split_protocol(part)[0]
        if protocol is None:
            continue
        if protocol not in fsspec.available_protocols():
            known = [p for p in _SHOWN_SCHEMES if p in fsspec.available_protocols()]
            raise ConfigError(
                f"{option} {shown(url)!r} has an unknown storage scheme '{protocol}://' "
                f"(known: {', '.join(known)} and the other fsspec protocols)",
                hint="give a local path, or a URL whose scheme fsspec knows",
            )
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            raise ConfigError(
                f"{option} {shown(url)!r} needs a package that is not installed: {_brief(exc)}",
                hint=f"install the fsspec package for {protocol}:// (e.g. pip install s3fs, gcsfs, adlfs)",
            ) from None


def shown(url: str) -> str:
    """`url` as an error message may print it: a local path as given, a URL without secrets."""
    return public_location(url) if "://" in str(url) else str(url)


def real_root(fs: AbstractFileSystem, root: str) -> str:
    """The cache root with every symbolic link in it resolved, once, on a local filesystem.

    The root may itself be a link (a cache kept on another disk); nothing below it may be.
    Resolving it once means every later check and read sees the same directory.
    """
    return os.path.realpath(root) if is_local(fs) else root


def check_cache_tree(fs: AbstractFileSystem, root: str, names: tuple[str, ...]) -> None:
    """On a local filesystem, refuse a link or a device, fifo or socket at or anywhere under
    `root`/name for each of `names` (`CacheCorruptError` naming the path and the fix)."""
    if is_local(fs):
        check_local_tree(root, names)


def storage_failures() -> tuple[type[BaseException], ...]:
    """The exception types a filesystem layer raises for a failing store.

    botocore and aiohttp are looked up only when already imported: an error of theirs can
    only come from a filesystem (s3fs, gcsfs, http) that imported them.
    """
    kinds: list[type[BaseException]] = [OSError]
    if (botocore := sys.modules.get("botocore.exceptions")) is not None:
        kinds += [botocore.BotoCoreError, botocore.ClientError]
    if (aiohttp := sys.modules.get("aiohttp")) is not None:
        kinds.append(aiohttp.ClientError)
    return tuple(kinds)


@contextlib.contextmanager
def storage_errors(url: str, doing: str) -> Iterator[None]:
    """Turn what the storage raises inside the block into a one-line `KdcacheError` naming
    `url` (`CacheNotFoundError` for a missing file, `StorageError` for the rest); kdcache's
    own errors pass through unchanged."""
    try:
        yield
    except KdcacheError:
        raise
    except TypeError as exc:
        # A filesystem hands its options to its client only on first use (s3fs builds its
        # session then): an option it does not take surfaces here, not when it is created.
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(
            f"{shown(url)}: the storage refused an option ({_brief(exc)})",
            hint="check each --storage-option KEY against the filesystem's documentation",
        ) from exc
    except storage_failures() as exc:
        where, text = shown(url), _scrub(_brief(exc), url)
        if isinstance(exc, FileNotFoundError):
            raise CacheNotFoundError(
                f"{where}: {text} (while {doing})",
                hint="check the path or URL; a listed file that is gone must be restored from the cache's producer",
            ) from exc
        if isinstance(exc, PermissionError):
            raise StorageError(
                f"{where}: permission denied while {doing} ({text})",
                hint="check the credentials (--storage-option key=... secret=..., or the environment) and the access rights",
            ) from exc
        raise StorageError(
            f"{where}: the storage failed while {doing} ({type(exc).__name__}: {text})",
            hint="check that the store is reachable (endpoint, network, disk) and the --storage-option settings, then re-run",
        ) from exc


def _scrub(text: str, url: str) -> str:
    """`text` without the user, password and secret query values of `url` (a store's own
    message may quote the URL it was given)."""
    if "://" not in str(url):
        return text
    parts = urlsplit(str(url))
    query = parse_qsl(parts.query, keep_blank_values=True)
    secrets = [parts.password, parts.username] + [v for k, v in query if _SECRET_PARAM.search(k)]
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


_SECRET_PARAM = re.compile(
    r"sig|signature|token|secret|password|passwd|pwd|key|credential|auth|session|^x-amz-|^x-goog-",
    re.IGNORECASE,
)


def public_location(location: str) -> str:
    """`location` as a manifest may record it: nothing local, nothing secret.

    URLs lose their user, password, fragment and every query parameter that looks like a
    credential (signatures, tokens, keys). Local paths keep only their last component (a
    directory's name, a file name or glob), since /home/... means nothing to another team; what
    identifies the thing is its hash, recorded beside it. Anything else (a hub id such as
    "meta-llama/Llama-3.2-1B", a label such as "embedded:...") is kept as it is.
    """
    text = str(location)
    if "://" in text:
        parts = urlsplit(text)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        kept = urlencode([(k, v) for k, v in query if not _SECRET_PARAM.search(k)])
        return urlunsplit((parts.scheme, host, parts.path, kept, ""))
    if text.startswith("embedded:"):
        return text
    local = (
        os.path.isabs(text)
        or text.startswith(("./", "../", "~"))
        or os.path.exists(text)
        or any(c in text for c in "*?[")
        or text.count("/") != 1
    )
    return posixpath.basename(text.rstrip("/\\")) or text if local else text


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` so that a reader sees the old content or the new, never a mix.

    Local files go through a temporary sibling, fsync and rename; object stores put whole
    objects atomically by themselves.
    """
    if not is_local(fs):
        retrying(fs, path, "writing it", lambda: fs.pipe_file(path, data))
        return
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fs.mv(tmp, path)
    sync_folder(parent)  # the rename itself on the disk, before anything that follows it


def move_tree(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """Move a file or a folder of files from `src` to `dst`.

    A local rename is atomic. Object stores have no folders and no rename: each object is
    copied on the store's side (no bytes through this process), then the originals deleted;
    each step is retried on its own (`schemas._retry`), as both are idempotent.
    """
    if is_local(fs):
        fs.mv(src, dst, recursive=True)
        return
    files = retrying(fs, src, "listing it", lambda: sorted(fs.find(src, withdirs=False)))
    targets = [dst] if files == [src] else [join(dst, posixpath.relpath(f, src)) for f in files]
    retrying(fs, dst, "copying into it", lambda: fs.copy(files, targets))
    failed = False

    def remove() -> None:
        nonlocal failed
        try:
            fs.rm(src, recursive=True)
        except FileNotFoundError:
            if not failed:
                raise  # gone before the first try: not what a move expects
            # else a failed try deleted everything before its answer was lost
        except Exception:
            failed = True
            raise

    retrying(fs, src, "removing it after its copy", remove)


def read_bounded(fs: AbstractFileSystem, path: str, limit: int, *, root: str | None) -> bytes:
    """The bytes of one file, at most `limit` + 1 of them: a result longer than `limit` means
    the file is larger than allowed (each caller knows how large it may be).

    On a local filesystem no link at or below `root` is followed and only a regular file is
    opened (`schemas._localfs`).
    """
    if is_local(fs):
        check_inside(root, path)
        with open_regular(path) as f:
            # read(n) allocates n bytes up front: ask for what the file holds, not the cap.
            return f.read(min(limit, os.fstat(f.fileno()).st_size) + 1)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            parts: list[bytes] = []
            got = 0
            while got <= limit and (block := f.read(min(_BLOCK, limit + 1 - got))):
                parts.append(block)
                got += len(block)
            return b"".join(parts)

    return retrying(fs, path, "reading it", read)


def read_declared(
    fs: AbstractFileSystem, path: str, declared: int, *, root: str
) -> bytes | mmap.mmap:
    """The whole of a file whose size the manifest declares, refused unless it has exactly
    that size. Local files are memory-mapped (a regular file, no link below `root`), others
    read, never past `declared` + 1 bytes."""
    if is_local(fs):
        check_inside(root, path)
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != declared:
                raise _size_differs(path, size, declared)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read(declared + 1)

    data = retrying(fs, path, "reading it", read)
    if len(data) != declared:
        shown = f"more than {declared}" if len(data) > declared else str(len(data))
        raise _size_differs(path, shown, declared)
    return data


def check_tree_size(fs: AbstractFileSystem, path: str, declared: int, *, root: str) -> None:
    """On a local filesystem, refuse a tree below `root` that holds a link or special file, or
    whose files do not add up to `declared` bytes: what a reader that opens files by name
    (zarr's LocalStore) may then open is what the manifest describes."""
    if is_local(fs):
        check_inside(root, path)
        size = sum(e.stat(follow_symlinks=False).st_size for e in local_files(path))
        if size != declared:
            raise _size_differs(path, size, declared)


def _size_differs(path: str, size: int | str, declared: int) -> CacheCorruptError:
    return CacheCorruptError(
        f"{path} has {size} bytes, the manifest says {declared} (truncated or replaced)",
        hint=_FIX_SIZE,
    )


def _too_large(path: str, declared: int) -> CacheCorruptError:
    return CacheCorruptError(
        f"{path} is larger than the manifest says ({declared} bytes): it was replaced or grew",
        hint=_FIX_SIZE,
    )


def checksum_file(
    fs: AbstractFileSystem, path: str, *, root: str | None = None, declared: int | None = None
) -> tuple[str, int]:
    """(`sha256:<hex>`, size in bytes) of one file, read in blocks.

    With `declared` (the manifest's size), reading stops once the file proves larger and
    `CacheCorruptError` says so: a shard swapped for something endless is never read to the
    end. Local files are opened only as regular files with no link at or below `root`.
    """
    limit = declared if declared is not None else math.inf
    if is_local(fs):
        check_inside(root, path)
        f = open_regular(path)
        if os.fstat(f.fileno()).st_size > limit:
            f.close()
            raise _too_large(path, int(limit))
        with f:
            digest, size = _hash(f, limit)
    else:
        digest, size = _hash_remote(fs, path, limit)
    if size > limit:
        raise _too_large(path, int(limit))
    return digest, size


def checksum_tree(
    fs: AbstractFileSystem, path: str, *, root: str | None = None, declared: int | None = None
) -> tuple[str, int]:
    """(`sha256:<hex>`, total bytes) of every file under `path`, in relative-path order.

    Each file contributes its relative path and its own digest, so a renamed, added, missing or
    changed file all change the result. With `declared`, a tree whose files add up to more is
    refused before any is read (sizes from the listing), and reading stops if they grow.
    Local trees are walked without following links, and only regular files are read.
    """
    if is_local(fs):
        check_inside(root, path)
        files = {e.path: e.stat(follow_symlinks=False).st_size for e in local_files(path)}
    else:
        found = retrying(fs, path, "listing it", lambda: fs.find(path, withdirs=False, detail=True))
        files = {name: int(info.get("size") or 0) for name, info in found.items()}
    limit = declared if declared is not None else math.inf
    if sum(files.values()) > limit:
        raise _too_large(path, int(limit))
    h = hashlib.sha256()
    total = 0
    for file in sorted(files):
        if is_local(fs):
            with open_regular(file) as f:
                digest, size = _hash(f, limit - total)
        else:
            digest, size = _hash_remote(fs, file, limit - total)
        total += size
        if total > limit:
            raise _too_large(path, int(limit))
        rel = posixpath.relpath(file, path)
        h.update(f"{rel}\0{digest}\0{size}\n".encode())
    return "sha256:" + h.hexdigest(), total


def _hash_remote(fs: AbstractFileSystem, path: str, limit: float) -> tuple[str, int]:
    """`_hash` of a file on an object store, read again from its start after a transient
    failure (`schemas._retry`)."""

    def read() -> tuple[str, int]:
        with fs.open(path, "rb") as f:
            return _hash(f, limit)

    return retrying(fs, path, "reading it", read)


def _hash(f: BinaryIO, limit: float) -> tuple[str, int]:
    """(`sha256:<hex>`, bytes read) of a stream, read in blocks and no further than one block
    past `limit` bytes (the caller refuses a size over `limit`)."""
    h = hashlib.sha256()
    size = 0
    while size <= limit and (block := f.read(_BLOCK)):
        h.update(block)
        size += len(block)
    return "sha256:" + h.hexdigest(), size
