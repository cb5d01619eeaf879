"""One writer per cache: the lock a build, merge, split or subset holds on its output.

Without it, two builds on one `--out` both run: the second redoes the teacher's work and
replaces shards the first committed while readers of the cache see errors. The lock is one
small object at the cache root, `lock.json`:

    {"kdcache_lock": 1, "run_id": "<32 hex>", "command": "kdcache build", "host": "node-3",
     "pid": 4242, "job": "torchrun:<run id>@<master addr>:<port>/<world size>" or null,
     "acquired": <unix time>, "heartbeat": <unix time>, "stale_after": 300.0}

Taking it must let exactly one writer win, on every store a cache can live on:
- local disk: the lock is written to a private temporary, fsynced, and hard-linked to
  `lock.json`; link() fails when the name exists, so one writer creates it, and it appears whole
  (O_CREAT|O_EXCL where the filesystem has no hard links). Every later change (heartbeat,
  takeover, release) happens under flock() on the current lock file, re-checked to still be at
  `lock.json` once held: a compare-and-swap. A filesystem without flock leaves a small race
  between reading the lock and replacing it.
- S3 (s3fs): PutObject with `If-None-Match: *` creates it, and with `If-Match: <ETag>` renews or
  takes it over, so the store itself lets one writer win. The lock is read back after each
  write, for S3-compatible stores that ignore the conditions.
- any other store (memory://, gs://, az://, ...): fsspec's create (an existence check, then a
  write), then, after `SETTLE_SECONDS`, a read-back: a writer that finds another's lock steps
  back. The race that remains: two writers whose check-to-write times both exceed the settle
  time can both believe they hold it. memory:// lives in one process, where a mutex makes every
  step exact.

While held, a daemon thread rewrites `heartbeat` every `stale_after / 10` seconds (30 s by
default), first checking that the lock is still this run's. A lock whose heartbeat is older than
its own `stale_after` (300 s by default; the environment variable KDCACHE_LOCK_STALE_SECONDS
sets it for the writers a process starts) belongs to a dead writer and is taken over, with a
message; `break_lock` (the CLI's --break-lock) takes any lock at once. Hosts sharing a cache
need clocks that agree to well within the stale time (NTP does).

A holder that finds its lock taken, or could not renew it for a whole stale time, has lost it:
`check()` raises `LockLostError`, and `CacheWriter` calls it before every commit, so a build that
lost its lock stops before it commits another shard. The lock is released (deleted, if still
this run's) on success and on error; a SIGKILLed writer leaves it to go stale. Under torchrun
rank 0 takes it, and the other ranks `join` it: it must name their job (`torchrun_job`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fsspec import AbstractFileSystem

from schemas._lockstores import (
    LOCK_FILE,
    MAX_STALE,
    SETTLE_SECONDS,
    LockOwner,
    Seen,
    Store,
    store_for,
)
from schemas.errors import ConfigError, KdcacheError
from schemas.storage import is_local, resolve, shown, storage_errors, storage_failures

__all__ = [
    "DEFAULT_STALE_SECONDS",
    "LOCK_FILE",
    "SETTLE_SECONDS",
    "STALE_ENV",
    "CacheLock",
    "CacheLockedError",
    "LockLostError",
    "LockOwner",
    "is_lock_file",
    "read_lock",
    "torchrun_job",
]

STALE_ENV = "KDCACHE_LOCK_STALE_SECONDS"
"""Environment variable: the stale time a writer started by this process promises."""
DEFAULT_STALE_SECONDS = 300.0
"""A lock whose heartbeat is older than this (its own `stale_after`) is a dead writer's."""
BEATS_PER_STALE = 10
"""Heartbeats per stale time: a holder misses nine before its lock can be taken."""


class CacheLockedError(KdcacheError):
    """Another writer holds the lock on the cache."""


class LockLostError(CacheLockedError):
    """This writer's lock was taken over, broken, or could not be renewed in time."""


def _owner(seen: Seen | None) -> LockOwner | None:
    return LockOwner.parse(seen.data) if seen is not None else None


def _say(message: str) -> None:
    print(f"kdcache: {message}", file=sys.stderr, flush=True)


def stale_seconds(value: float | None = None) -> float:
    """`value`, or the stale time KDCACHE_LOCK_STALE_SECONDS sets, or the default; checked."""
    where = "the stale time"
    if value is None:
        text = os.environ.get(STALE_ENV, "").strip()
        if not text:
            return DEFAULT_STALE_SECONDS
        where = f"{STALE_ENV}={text!r}"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not 0 < value <= MAX_STALE:  # NaN fails too
        raise ConfigError(
            f"{where} is not a number of seconds in (0, {MAX_STALE:g}]",
            hint=f"set {STALE_ENV} to seconds, e.g. 300 (the default), or unset it",
        )
    return float(value)


def torchrun_job() -> str | None:
    """The identity every rank of one torchrun launch shares, and two launches running at once
    never do (their rendezvous endpoint differs); None outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1:
        return None
    env = os.environ.get
    return (
        f"torchrun:{env('TORCHELASTIC_RUN_ID', 'none')}@{env('MASTER_ADDR', '')}:"
        f"{env('MASTER_PORT', '')}/{world}"
    )


def is_lock_file(name: str) -> bool:
    """Whether a name at a cache root is the lock or a temporary of it (not cache content)."""
    return name == LOCK_FILE or (name.startswith(".lock-") and name.endswith(".tmp"))


def read_lock(url: str, **storage_options: Any) -> LockOwner | None:
    """Who holds the lock on the cache at `url` (None: nobody, or an unreadable lock)."""
    fs, root = resolve(url, **storage_options)
    with storage_errors(url, "reading its lock"):
        seen = store_for(fs, root, uuid.uuid4().hex).read()
    return _owner(seen)


class CacheLock:
    """A held (or, for torchrun ranks other than 0, joined) lock; `acquire` or `join` it."""

    def __init__(
        self,
        url: str,
        store: Store,
        owner: LockOwner,
        *,
        leader: bool,
        notify: Callable[[str], None],
        created: str | None = None,
    ) -> None:
        self.url, self.owner, self.leader = url, owner, leader
        self._store, self._notify, self._created = store, notify, created
        self._lost: str | None = None
        self._error: BaseException | None = None
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._released = False
        self._thread = threading.Thread(
            target=self._run, name=f"kdcache-lock-{owner.run_id[:8]}", daemon=True
        )
        self._thread.start()

    @property
    def heartbeat_seconds(self) -> float:
        return self.owner.stale_after / BEATS_PER_STALE

    @classmethod
    def acquire(
        cls,
        url: str,
        *,
        command: str = "kdcache",
        job: str | None = None,
        break_lock: bool = False,
        stale_after: float | None = None,
        notify: Callable[[str], None] | None = None,
        **storage_options: Any,
    ) -> CacheLock:
        """Take the lock on the cache at `url`, or raise `CacheLockedError` naming its holder.

        A stale lock is taken over, and with `break_lock` any lock; `notify` (stderr by default)
        is told which. `stale_after` defaults to KDCACHE_LOCK_STALE_SECONDS, else 300 s.
        """
        stale = stale_seconds(stale_after)
        notify = notify or _say
        fs, root = resolve(url, **storage_options)
        with storage_errors(url, "taking the lock on it"):
            created = _make_root(fs, root)
            try:
                store, owner, message = _take(url, fs, root, command, job, stale, break_lock)
            except BaseException:
                _remove_if_empty(created)
                raise
        if message:
            notify(message)
        return cls(url, store, owner, leader=True, notify=notify, created=created)

    @classmethod
    def join(
        cls, url: str, *, job: str | None, notify: Callable[[str], None] | None = None,
        **storage_options: Any,
    ) -> CacheLock:  # fmt: skip
        """Share the lock rank 0 of this torchrun job holds (it must name `job`), and watch it."""
        fs, root = resolve(url, **storage_options)
        with storage_errors(url, "reading its lock"):
            store = store_for(fs, root, uuid.uuid4().hex)
            seen = store.read()
        where = shown(url)
        if seen is None:
            raise CacheLockedError(
                f"{where} holds no lock, though rank 0 of this torchrun job took it",
                hint="another process removed it; make sure one build writes there, then re-run",
            )
        owner = _owner(seen)
        if owner is None or owner.job != job:
            holder = owner.describe(time.time()) if owner else "an unreadable lock"
            raise CacheLockedError(
                f"{where} is locked by another build: {holder}, not this torchrun job ({job})",
                hint="wait for it to finish, or choose another --out",
            )
        return cls(url, store, owner, leader=False, notify=notify or _say)

    def check(self) -> None:
        """Raise `LockLostError` unless this writer still holds the lock (cheap: no I/O)."""
        if self._lost:
            raise LockLostError(self._lost, hint=_LOST_FIX)
        late = time.monotonic() - self._renewed
        if self.leader and late > self.owner.stale_after:
            why = f" ({type(self._error).__name__}: {self._error})" if self._error else ""
            raise LockLostError(
                f"{shown(self.url)}: this build could not renew its lock's heartbeat for "
                f"{late:.0f} s (stale after {self.owner.stale_after:g} s){why}, so another build "
                "may have taken it over",
                hint=_LOST_FIX,
            )

    def release(self) -> None:
        """Stop the heartbeat and, if the lock is still this run's, delete it. Never raises
        for a failing store (it would hide the error a build stops on): says so instead."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._released or not self.leader:
            return
        self._released = True
        try:
            with storage_errors(self.url, "releasing its lock"):
                seen = self._store.read()
                if (owner := _owner(seen)) and owner.run_id == self.owner.run_id:
                    assert seen is not None
                    self._store.remove(seen)
        except KdcacheError as exc:
            self._notify(f"could not release the lock ({exc}); it goes stale by itself")
        _remove_if_empty(self._created)

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds) and not self._lost:
            try:
                self._beat() if self.leader else self._watch()
            except (KdcacheError, *storage_failures()) as exc:
                self._error = exc  # tried again next beat; `check` stops the build in time

    def _beat(self) -> None:
        """Renew the heartbeat if the lock is still this run's; note it lost otherwise."""
        seen = self._store.read()
        if self._foreign(seen):
            return
        assert seen is not None
        renewed = dataclasses.replace(self.owner, heartbeat=time.time())
        if self._store.swap(seen, renewed.to_bytes(), taking=False):
            self.owner, self._renewed, self._error = renewed, time.monotonic(), None
        else:
            self._foreign(self._store.read())

    def _watch(self) -> None:
        self._foreign(self._store.read())

    def _foreign(self, seen: Seen | None) -> bool:
        """Whether `seen` is no longer this run's lock (then the lock is lost)."""
        if (owner := _owner(seen)) is not None:
            if owner.run_id == self.owner.run_id:
                return False
            holder = owner.describe(time.time())
        else:
            holder = "nobody (it was removed)" if seen is None else "an unreadable lock"
        self._lost = f"{shown(self.url)}: this build lost its lock; it is now held by {holder}"
        return True


_LOST_FIX = (
    "make sure one build writes there at a time (a lock is broken with --break-lock or taken "
    "once stale), then re-run the same command: it resumes from the committed shards"
)


def _take(
    url: str, fs: AbstractFileSystem, root: str, command: str, job: str | None, stale: float,
    break_lock: bool,
) -> tuple[Store, LockOwner, str]:  # fmt: skip
    """Create the lock, or take over a stale (or, breaking, any) one: (store, owner, what to
    say). Retries when other writers change the lock under us."""
    run_id = uuid.uuid4().hex
    store = store_for(fs, root, run_id)
    where = shown(url)
    message = ""
    for _ in range(50):
        now = time.time()
        owner = LockOwner(
            run_id=run_id, command=command, host=socket.gethostname(), pid=os.getpid(),
            job=job, acquired=now, heartbeat=now, stale_after=stale,
        )  # fmt: skip
        seen = store.read()
        if seen is None:
            if store.create(owner.to_bytes()):
                return store, owner, ""
            continue
        holder = _owner(seen)
        if holder is not None and holder.run_id == run_id:
            # Ours: a create or swap the store applied, but whose answer was lost and whose
            # retry (botocore retries by itself) was refused as a conflict.
            return store, holder, message
        if break_lock:
            what = holder.describe(now) if holder else "an unreadable lock"
            message = f"breaking the lock on {where} held by {what} (--break-lock)"
        elif holder is None:
            raise CacheLockedError(
                f"{where} holds a lock file {LOCK_FILE} that cannot be read (a newer kdcache's, "
                "or damaged)",
                hint="if no build is writing there, pass --break-lock",
            )
        elif holder.stale(now):
            message = f"taking over a stale lock on {where}: {holder.describe(now)}"
        else:
            raise CacheLockedError(
                f"{where} is locked by another build: {holder.describe(now)}",
                hint="wait for it to finish, or write elsewhere; if it is dead (killed, machine "
                f"lost) re-run once its heartbeat is {holder.stale_after:g} s old (it is then "
                "taken over), or now with --break-lock",
            )
        if store.swap(seen, owner.to_bytes(), taking=True):
            if holder is not None:
                store.forget(holder.run_id)
            return store, owner, message
    raise CacheLockedError(
        f"{where}: could not take the lock, other writers kept changing it",
        hint="make sure one build writes there at a time, then re-run",
    )


def _make_root(fs: AbstractFileSystem, root: str) -> str | None:
    """Create a local cache folder for the lock; returns it when it did not exist before."""
    if not is_local(fs) or os.path.isdir(root):
        return None
    os.makedirs(root, exist_ok=True)
    return root


def _remove_if_empty(folder: str | None) -> None:
    """Remove a folder the lock created when nothing else was written into it, so a refused or
    failed writer leaves no trace."""
    if folder is not None:
        with contextlib.suppress(OSError):  # rmdir fails unless empty: a used folder stays
            os.rmdir(folder)
