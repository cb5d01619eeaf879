"""Where caches live: local paths and fsspec URLs, atomic writes and checksums."""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid

import fsspec
from fsspec import AbstractFileSystem

_BLOCK = 1 << 22


def resolve(url: str, **storage_options: object) -> tuple[AbstractFileSystem, str]:
    """(filesystem, root path) for a local path or an fsspec URL (file://, s3://, memory://)."""
    fs, root = fsspec.core.url_to_fs(str(url), **storage_options)
    return fs, root.rstrip("/") or "/"


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
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fs.mv(tmp, path)


def checksum_file(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    """(`sha256:<hex>`, size in bytes) of one file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return "sha256:" + h.hexdigest(), size


def checksum_tree(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    """(`sha256:<hex>`, total bytes) of every file under `path`, in relative-path order.

    Each file contributes its relative path and its own digest, so a renamed, added, missing or
    changed file all change the result.
    """
    h = hashlib.sha256()
    total = 0
    files = sorted(fs.find(path, withdirs=False))
    for file in files:
        digest, size = checksum_file(fs, file)
        rel = posixpath.relpath(file, path)
        h.update(f"{rel}\0{digest}\0{size}\n".encode())
        total += size
    return "sha256:" + h.hexdigest(), total
