"""The lock file of `schemas.lock` (`LockOwner`), and how it is created, swapped and removed on
each kind of store.

Every store offers the same four steps, each of which lets at most one writer win where the
store makes that possible (see `schemas.lock` for what each store guarantees):

- `read()`: the lock's bytes and the store's version tag of them (S3's ETag), or None;
- `create(data)`: write the lock where there is none; False when one exists;
- `swap(seen, data)`: replace the lock if it still is `seen`; False when it changed;
- `remove(seen)`: delete the lock if it still is `seen`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from fsspec import AbstractFileSystem

from schemas._durable import sync_folder
from schemas.errors import CacheCorruptError, KdcacheError
from schemas.storage import is_local, join, read_bounded

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: local locks without the flock guard
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "lock.json"
"""The lock a writer (build, merge, split, subset) holds on the cache while it writes."""
MAX_LOCK_BYTES = 64 << 10
"""A lock file is a few hundred bytes; anything larger is not one (and is not read whole)."""
SETTLE_SECONDS = 1.0
"""On a store without conditional writes: how long a writer waits after writing the lock
before reading it back, so that a racing writer's write has landed by then."""
_GUARD_WAIT = 10.0
"""Seconds to wait for another process's flock on the lock (held for milliseconds)."""
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
_NO_FLOCK = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
MAX_STALE = 7 * 24 * 3600.0
"""The longest stale time a lock may state (a week)."""
_PROCESS = threading.Lock()
"""Serialises this process's steps on stores without conditional writes (memory:// is exact)."""


@dataclass(frozen=True, kw_only=True)
class LockOwner:
    """Who holds a lock, and how fresh it is (times in seconds since the epoch, UTC)."""

    run_id: str
    command: str
    host: str
    pid: int
    job: str | None
    """The torchrun job every rank of one launch shares (`torchrun_job`); None outside one."""
    acquired: float
    heartbeat: float
    stale_after: float

    def to_bytes(self) -> bytes:
        return json.dumps({"kdcache_lock": 1, **dataclasses.asdict(self)}, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> LockOwner | None:
        """The owner a lock file names; None when it is not a lock this kdcache can read."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(raw, dict) or raw.get("kdcache_lock") != 1:
            return None
        texts = [raw.get(k) for k in ("run_id", "command", "host")]
        times = [raw.get(k) for k in ("acquired", "heartbeat", "stale_after")]
        job, pid = raw.get("job"), raw.get("pid")
        if (
            not all(isinstance(t, str) and 0 < len(t) <= 256 for t in texts)
            or not all(isinstance(t, int | float) and math.isfinite(t) for t in times)
            or not (job is None or (isinstance(job, str) and len(job) <= 512))
            or not (isinstance(pid, int) and not isinstance(pid, bool))
            or not 0 < times[2] <= MAX_STALE
        ):
            return None
        return cls(
            run_id=texts[0], command=texts[1], host=texts[2], pid=pid, job=job,
            acquired=float(times[0]), heartbeat=float(times[1]), stale_after=float(times[2]),
        )  # fmt: skip

    def stale(self, now: float) -> bool:
        return now - self.heartbeat > self.stale_after

    def describe(self, now: float) -> str:
        job = f", torchrun job {self.job}" if self.job else ""
        return (
            f"{self.command} (pid {self.pid} on {self.host}, run {self.run_id[:8]}{job}) since "
            f"{_utc(self.acquired)}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago "
            f"(stale after {self.stale_after:g} s)"
        )


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Seen:
    """The lock as read: its bytes, and the store's version tag (S3 ETag; None elsewhere)."""

    data: bytes
    tag: str | None = None


class Store(ABC):
    def __init__(self, fs: AbstractFileSystem, root: str, run_id: str) -> None:
        self.fs, self.root, self.run_id = fs, root, run_id
        self.path = join(root, LOCK_FILE)

    @abstractmethod
    def read(self) -> Seen | None: ...

    @abstractmethod
    def create(self, data: bytes) -> bool: ...

    @abstractmethod
    def swap(self, seen: Seen, data: bytes, *, taking: bool) -> bool:
        """`taking`: a takeover (a heartbeat need not wait to read its write back)."""

    @abstractmethod
    def remove(self, seen: Seen) -> None: ...

    def forget(self, run_id: str) -> None:  # noqa: B027 - only local stores leave temporaries
        """Delete what a dead writer `run_id` may have left beside the lock (a temporary)."""

    def _landed(self, data: bytes) -> bool:
        seen = self.read()
        return seen is not None and seen.data == data


def store_for(fs: AbstractFileSystem, root: str, run_id: str) -> Store:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if is_local(fs):
        return LocalStore(fs, root, run_id)
    if protocols & {"s3", "s3a"} and hasattr(fs, "call_s3"):
        return S3Store(fs, root, run_id)
    return PlainStore(fs, root, run_id, settle=0.0 if "memory" in protocols else SETTLE_SECONDS)


class LocalStore(Store):
    """Created by hard link (or O_EXCL), changed under flock() of the current lock file."""

    def _tmp(self, run_id: str | None = None) -> str:
        return join(self.root, f".lock-{run_id or self.run_id}.tmp")

    def read(self) -> Seen | None:
        # No flock needed: a lock file is never changed in place, only replaced whole.
        if (opened := self._open(os.O_RDONLY)) is None:
            return None
        try:
            return Seen(_read_fd(opened[0]))
        finally:
            os.close(opened[0])

    def _open(self, flags: int) -> tuple[int, os.stat_result] | None:
        """The lock file, open (never through a link, only a regular file), or None."""
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _not_a_file(self.path) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _not_a_file(self.path)
        return fd, st

    def create(self, data: bytes) -> bool:
        tmp = self._tmp()
        _write_new(tmp, data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            return self._create_exclusive(data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        sync_folder(self.root)
        return True

    def _create_exclusive(self, data: bytes) -> bool:
        """Without hard links: O_EXCL. A reader may see the file before it is whole; it reads
        as unreadable, which refuses too."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sync_folder(self.root)
        return True

    def swap(self, seen: Seen, data: bytes, *, taking: bool) -> bool:
        with self._guard() as fd:
            if fd is None or _read_fd(fd) != seen.data:
                return False
            tmp = self._tmp()
            _write_new(tmp, data)
            os.replace(tmp, self.path)
        sync_folder(self.root)
        return True

    def remove(self, seen: Seen) -> None:
        with self._guard() as fd:
            if fd is not None and _read_fd(fd) == seen.data:
                os.unlink(self.path)
        sync_folder(self.root)

    def forget(self, run_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp(run_id))

    @contextlib.contextmanager
    def _guard(self) -> Iterator[int | None]:
        """The current lock file, open and flock()ed, re-checked to still be at `lock.json`
        once held (a swap replaces the file: who waited on the old one tries again); None
        when there is none."""
        deadline = time.monotonic() + _GUARD_WAIT
        while True:
            if (opened := self._open(os.O_RDWR)) is None:
                yield None
                return
            fd, held = opened
            try:
                _flock(fd, deadline, self.path)
                try:
                    now = os.lstat(self.path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    yield fd
                    return
            finally:
                os.close(fd)  # closing drops the flock


def _flock(fd: int, deadline: float, path: str) -> None:
    if fcntl is None:
        return
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise KdcacheError(
                    f"{path} has been held by another process for {_GUARD_WAIT:g} s",
                    hint="a writer is stopped mid-change (SIGSTOP?); resume or kill it, then re-run",
                ) from None
            time.sleep(0.002)
        except OSError as exc:
            if exc.errno in _NO_FLOCK:  # a filesystem without flock: unguarded (see the module)
                return
            raise


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    parts, size = [], 0
    while size <= MAX_LOCK_BYTES and (block := os.read(fd, MAX_LOCK_BYTES + 1 - size)):
        parts.append(block)
        size += len(block)
    return b"".join(parts)


def _write_new(path: str, data: bytes) -> None:
    """Write a private temporary in full and fsync it (it never existed, or was ours)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _not_a_file(path: str) -> CacheCorruptError:
    return CacheCorruptError(
        f"{path} is a link or a special file, not a lock",
        hint="remove it if no build is writing there",
    )


class S3Store(Store):
    """PutObject with If-None-Match / If-Match: the store lets one writer win."""

    def read(self) -> Seen | None:
        # The version tag first: if the object changes before it is read, the tag is the
        # older one and a swap with it fails, never the other way round.
        self.fs.invalidate_cache(self.path)
        try:
            info = self.fs.info(self.path)
            if int(info.get("size") or 0) > MAX_LOCK_BYTES:
                return Seen(b"", info.get("ETag"))
            return Seen(self.fs.cat_file(self.path), info.get("ETag"))
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
            return False
        return self._landed(data)

    def swap(self, seen: Seen, data: bytes, *, taking: bool) -> bool:
        try:
            self.fs.pipe_file(self.path, data, IfMatch=seen.tag)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
            return False
        return self._landed(data)

    def remove(self, seen: Seen) -> None:
        # A swap between this read and the delete needs a writer that found this lock stale.
        now = self.read()
        if now is not None and now.data == seen.data:
            self.fs.rm(self.path)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether s3fs's error is S3 refusing a condition (412; 409 for a concurrent one)."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        cause = cause.__cause__ or cause.__context__
    return False


class PlainStore(Store):
    """fsspec's create (check, then write) and plain writes, each read back after `settle`."""

    def __init__(self, fs: AbstractFileSystem, root: str, run_id: str, *, settle: float) -> None:
        super().__init__(fs, root, run_id)
        self.settle = settle

    def read(self) -> Seen | None:
        try:
            return Seen(read_bounded(self.fs, self.path, MAX_LOCK_BYTES, root=None))
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        with _PROCESS:
            try:
                self.fs.pipe_file(self.path, data, mode="create")
            except FileExistsError:
                return False
            except TypeError:  # a filesystem whose pipe_file predates mode="create"
                if self.fs.exists(self.path):
                    return False
                self.fs.pipe_file(self.path, data)
        time.sleep(self.settle)
        return self._landed(data)

    def swap(self, seen: Seen, data: bytes, *, taking: bool) -> bool:
        with _PROCESS:
            now = self.read()
            if now is None or now.data != seen.data:
                return False
            self.fs.pipe_file(self.path, data)
        if taking:
            time.sleep(self.settle)
        return self._landed(data)

    def remove(self, seen: Seen) -> None:
        with _PROCESS:
            now = self.read()
            if now is not None and now.data == seen.data:
                self.fs.rm(self.path)
