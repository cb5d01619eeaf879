"""Reading a local cache without trusting it: no links, no special files.

A cache is untrusted input. A shard that is a link to /dev/zero hangs whoever checksums it, a
fifo hangs whoever opens it, and a link to ~/.ssh/id_rsa or to another team's data is read as
if it were part of the cache. So below the cache root (which may itself be a link, resolved
once by `schemas.storage.real_root`) every path is lstat-ed component by component before it
is opened, trees are walked without following links, and files are opened with O_NOFOLLOW and
checked to be regular with fstat. `schemas.storage` builds its safe reads on these.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from schemas.errors import CacheCorruptError

_FIX_LINK = (
    "replace the link with the file or folder itself if you trust where it points "
    "(cp -rL), or restore the cache from its producer"
)
_FIX_SPECIAL = "remove it and restore the real file from the cache's producer"
_KINDS = (
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


def check_inside(root: str | None, path: str) -> os.stat_result | None:
    """lstat of local `path`, refusing a symbolic link at it or at any folder between `root`
    and it, and a non-folder in between; None when it does not exist (callers say "missing").

    With `root` None only `path` itself is checked (a writer's own staging files).
    """
    rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
    if rel == ".." or rel.startswith("../"):
        raise CacheCorruptError(
            f"{path} is outside the cache root {root}", hint="the manifest was edited or forged"
        )
    current = root if root else posixpath.dirname(path)
    st = None
    parts = [] if rel == "." else rel.split("/")
    for i, part in enumerate(parts):
        current = posixpath.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(current)
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise CacheCorruptError(
                f"{current} is not a folder", hint="restore the cache from its producer"
            )
    return st


def check_local_tree(root: str, names: Iterable[str]) -> None:
    """Refuse any link or special file at or under `root`/name, for each name (missing names
    are fine). One `scandir` per folder: cheap next to reading a single shard."""
    for name in names:
        path = posixpath.join(root, name)
        st = check_inside(root, path)
        if st is None or stat.S_ISREG(st.st_mode):
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _special_error(path, st)
        _ = sum(1 for _ in local_files(path))  # the walk raises on a link or special file


def local_files(top: str) -> Iterator[os.DirEntry[str]]:
    """Every regular file under local folder `top`, walked without following links; a link or
    special file anywhere under it raises `CacheCorruptError`."""
    try:
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            raise CacheCorruptError(
                f"{top} is not a folder", hint="restore it from the cache's producer"
            )
    except FileNotFoundError:
        return
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    raise _link_error(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry
                else:
                    raise _special_error(entry.path, entry.stat(follow_symlinks=False))


def open_regular(path: str) -> BinaryIO:
    """Open local `path` for reading only if it is a regular file, never through a link.

    O_NOFOLLOW refuses a link put there after the last check; O_NONBLOCK keeps a fifo from
    blocking the open until fstat has refused it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:  # a link (ELOOP), a socket (ENXIO): say which
        try:
            st = os.lstat(path)
        except OSError:
            raise exc from None
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(path) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _special_error(path, st) from exc
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _special_error(path, st)
    return os.fdopen(fd, "rb")


def _link_error(path: str) -> CacheCorruptError:
    try:
        target = f" to {os.readlink(path)!r}"
    except OSError:
        target = ""
    return CacheCorruptError(
        f"{path} is a symbolic link{target}; kdcache never follows links inside a cache",
        hint=_FIX_LINK,
    )


def _special_error(path: str, st: os.stat_result) -> CacheCorruptError:
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
    return CacheCorruptError(
        f"{path} is a {kind}, not a regular file; kdcache reads only regular files from a cache",
        hint=_FIX_SPECIAL,
    )
