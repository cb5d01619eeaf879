"""Where caches live: local paths and fsspec URLs, atomic writes and checksums."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem

_BLOCK = 1 << 22


def resolve(url: str, **storage_options: object) -> tuple[AbstractFileSystem, str]:
    """(filesystem, root path) for a local path or an fsspec URL (file://, s3://, memory://)."""
    fs, root = fsspec.core.url_to_fs(str(url), **storage_options)
    return fs, root.rstrip("/") or "/"


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


def move_tree(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """Move a file or a folder of files from `src` to `dst`.

    A local rename is atomic. Object stores have no folders and no rename: each object is
    copied on the store's side (no bytes through this process), then the originals deleted.
    """
    if is_local(fs):
        fs.mv(src, dst, recursive=True)
        return
    files = sorted(fs.find(src, withdirs=False))
    targets = [dst] if files == [src] else [join(dst, posixpath.relpath(f, src)) for f in files]
    fs.copy(files, targets)
    fs.rm(src, recursive=True)


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
