"""Making local writes durable before anything that depends on them is written.

A commit record must never reach the disk before the data it names: after a power loss the
kernel may have written the small record and not yet the shard's blocks, leaving a committed
shard of zeros or nothing. So, on a local disk, a shard's files and folders are fsynced before
its record is written, and each atomic rename (a record, the manifest, a moved shard) is made
durable by an fsync of the folder it happened in. Object stores need none of this: an upload is
durable once it returns.
"""

from __future__ import annotations

import errno
import os


def sync_tree(path: str) -> None:
    """fsync local `path` (a file, or every file and folder of a tree, walked without following
    links) and the folder holding it."""
    if os.path.isdir(path) and not os.path.islink(path):
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW)
            _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)
    else:
        _fsync(path, os.O_RDONLY | os.O_NOFOLLOW)
    sync_folder(os.path.dirname(path))


def sync_folder(path: str) -> None:
    """fsync local folder `path`: the names created, renamed or removed in it."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems and platforms cannot fsync a folder; its files still were.
        if not flags & os.O_DIRECTORY or exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
