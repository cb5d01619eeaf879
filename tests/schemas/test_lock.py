"""The lock a writer holds on a cache (`schemas.lock`): on a local disk, in memory:// and on S3
(the moto server of `tests.fixtures.s3`).

A lock left by a dead build is written here by hand, as the specification describes it
(FORMAT.md): that is all a killed build leaves behind.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest

from schemas.cache import CacheWriter
from schemas.lock import (
    LOCK_FILE,
    STALE_ENV,
    CacheLock,
    CacheLockedError,
    LockLostError,
    read_lock,
    torchrun_job,
)
from schemas.testing import random_records
from tests.schemas.test_cache import draft

BUCKET = "kdcache-lock-tests"


@dataclass
class Where:
    """A cache location of one kind of storage, and raw access to its lock object."""

    kind: str
    url: str
    options: dict[str, Any]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url, **self.options)[0]

    @property
    def path(self) -> str:
        root = fsspec.core.url_to_fs(self.url, **self.options)[1]
        return f"{root.rstrip('/')}/{LOCK_FILE}"

    def raw(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache()
        return json.loads(self.fs.cat_file(self.path)) if self.fs.exists(self.path) else None

    def plant(self, **fields: Any) -> dict[str, Any]:
        """Write the lock a dead build would leave: `fields` over a plausible one."""
        now = time.time()
        lock = {
            "kdcache_lock": 1,
            "run_id": uuid.uuid4().hex,
            "command": "kdcache build",
            "host": "gpu-node-7",
            "pid": 4242,
            "job": None,
            "acquired": now - 3600,
            "heartbeat": now - 1000,
            "stale_after": 300.0,
            **fields,
        }
        if self.kind == "local":
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fs.pipe_file(self.path, json.dumps(lock).encode())
        return lock


@pytest.fixture(params=["local", "memory", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Where]:
    name = uuid.uuid4().hex[:12]
    if request.param == "local":
        yield Where("local", str(tmp_path / "cache"), {})
    elif request.param == "memory":
        yield Where("memory", f"memory://lock-tests/{name}", {})
        memory = fsspec.filesystem("memory")
        if memory.exists(f"/lock-tests/{name}"):
            memory.rm(f"/lock-tests/{name}", recursive=True)
    else:
        options = request.getfixturevalue("s3_options")
        fsspec.filesystem("s3", **options).mkdirs(BUCKET, exist_ok=True)
        yield Where("s3", f"s3://{BUCKET}/{name}", options)


def acquire(where: Where, **kwargs: Any) -> CacheLock:
    return CacheLock.acquire(where.url, command="kdcache test", **kwargs, **where.options)


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def lost(lock: CacheLock) -> bool:
    try:
        lock.check()
    except LockLostError:
        return True
    return False


def test_acquire_names_its_owner_and_release_removes_it(where: Where) -> None:
    lock = acquire(where, job="torchrun:abc")
    raw = where.raw()
    assert raw is not None
    assert raw["host"] == socket.gethostname() and raw["pid"] == os.getpid()
    assert raw["run_id"] == lock.owner.run_id and len(raw["run_id"]) == 32
    assert raw["job"] == "torchrun:abc" and raw["command"] == "kdcache test"
    assert raw["stale_after"] == 300.0, "the default stale time"
    assert abs(raw["heartbeat"] - time.time()) < 5 and raw["acquired"] <= raw["heartbeat"]
    assert read_lock(where.url, **where.options) == lock.owner
    lock.release()
    assert where.raw() is None
    assert read_lock(where.url, **where.options) is None
    lock.release()  # twice is harmless


def test_a_held_lock_refuses_a_second_writer_in_one_line(where: Where) -> None:
    with acquire(where) as first:
        with pytest.raises(CacheLockedError) as refused:
            acquire(where)
        text = str(refused.value)
        assert "\n" not in text
        assert where.url in text and f"pid {os.getpid()} on {socket.gethostname()}" in text
        assert "kdcache test" in text and first.owner.run_id[:8] in text
        assert "since" in text and "UTC" in text and "last heartbeat" in text
        assert "stale after 300 s" in text and "--break-lock" in text
        assert where.raw()["run_id"] == first.owner.run_id, "the refused writer touched nothing"
    assert where.raw() is None


def test_the_heartbeat_keeps_the_lock_fresh(where: Where) -> None:
    with acquire(where, stale_after=1.0) as lock:
        first = where.raw()["heartbeat"]
        wait_for(lambda: where.raw()["heartbeat"] > first)
        time.sleep(1.3)  # longer than the stale time: beats (every 0.1 s) keep it fresh
        with pytest.raises(CacheLockedError, match="last heartbeat"):
            acquire(where)
        lock.check()


def test_stale_time_comes_from_the_environment(
    where: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STALE_ENV, "2.5")
    with acquire(where) as lock:
        assert where.raw()["stale_after"] == 2.5 and lock.heartbeat_seconds == 0.25
    monkeypatch.setenv(STALE_ENV, "soon")
    with pytest.raises(ValueError, match=STALE_ENV):
        acquire(where)


def test_a_stale_lock_is_taken_over_with_a_message(where: Where) -> None:
    dead = where.plant(heartbeat=time.time() - 400)
    said: list[str] = []
    with acquire(where, notify=said.append) as lock:
        assert where.raw()["run_id"] == lock.owner.run_id != dead["run_id"]
    assert len(said) == 1 and "taking over" in said[0] and "stale" in said[0]
    assert "pid 4242 on gpu-node-7" in said[0] and dead["run_id"][:8] in said[0]


def test_the_stale_time_is_the_holders_own(where: Where) -> None:
    """A holder that promised beats every 0.5 s is stale after 5 s; one with the default
    promise (300 s) is not, whatever the newcomer's own setting."""
    where.plant(heartbeat=time.time() - 5, stale_after=300.0)
    with pytest.raises(CacheLockedError):
        acquire(where, stale_after=1.0)
    where.plant(heartbeat=time.time() - 5, stale_after=1.0)
    acquire(where).release()


def test_break_lock_takes_a_live_lock_and_its_holder_stops(where: Where) -> None:
    holder = acquire(where, stale_after=0.5)
    said: list[str] = []
    breaker = acquire(where, break_lock=True, notify=said.append)
    assert len(said) == 1 and "--break-lock" in said[0]
    assert where.raw()["run_id"] == breaker.owner.run_id
    wait_for(lambda: lost(holder))  # its next heartbeat finds another owner
    with pytest.raises(LockLostError, match=breaker.owner.run_id[:8]):
        holder.check()
    holder.release()  # must not remove the lock it lost
    assert where.raw()["run_id"] == breaker.owner.run_id
    breaker.release()
    assert where.raw() is None


def test_a_holder_whose_heartbeat_cannot_be_written_stops_before_it_goes_stale(
    where: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = acquire(where, stale_after=0.4)
    monkeypatch.setattr(lock, "_beat", lambda: (_ for _ in ()).throw(OSError("store down")))
    time.sleep(0.6)
    with pytest.raises(LockLostError, match="heartbeat"):
        lock.check()
    monkeypatch.undo()
    lock.release()


def test_an_unreadable_lock_is_refused_until_broken(where: Where) -> None:
    if where.kind == "local":
        os.makedirs(os.path.dirname(where.path), exist_ok=True)
    where.fs.pipe_file(where.path, b'{"run_id": ')
    with pytest.raises(CacheLockedError, match=r"cannot be read.*--break-lock"):
        acquire(where)
    acquire(where, break_lock=True).release()


def test_ranks_of_one_torchrun_job_share_the_lock(where: Where) -> None:
    with acquire(where, job="torchrun:job-1") as lock:
        follower = CacheLock.join(where.url, job="torchrun:job-1", **where.options)
        assert follower.owner == lock.owner
        follower.check()
        follower.release()  # a follower never removes the lock
        assert where.raw()["run_id"] == lock.owner.run_id
        with pytest.raises(CacheLockedError, match="another build"):
            CacheLock.join(where.url, job="torchrun:job-2", **where.options)
    with pytest.raises(CacheLockedError, match="no lock"):
        CacheLock.join(where.url, job="torchrun:job-1", **where.options)


def test_a_follower_learns_when_its_jobs_lock_is_broken(where: Where) -> None:
    holder = acquire(where, job="torchrun:job-1", stale_after=0.5)
    follower = CacheLock.join(where.url, job="torchrun:job-1", **where.options)
    breaker = acquire(where, break_lock=True)
    wait_for(lambda: lost(follower))
    for lock in (follower, holder, breaker):
        lock.release()


def test_torchrun_job_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert torchrun_job() is None
    env = dict(
        WORLD_SIZE="2", TORCHELASTIC_RUN_ID="r1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    job = torchrun_job()
    assert job is not None and "r1" in job and "10.0.0.1:29500" in job
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert torchrun_job() != job


def race(where: Where, writers: int) -> tuple[list[CacheLock], list[CacheLockedError]]:
    """`writers` threads acquire the lock at once: (those that won, those refused)."""
    start = threading.Barrier(writers)
    won: list[CacheLock] = []
    refused: list[CacheLockedError] = []

    def one() -> None:
        start.wait()
        try:
            won.append(acquire(where, notify=lambda _: None))
        except CacheLockedError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=one) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_racing_writers_one_wins(tmp_path: Any, kind: str) -> None:
    """Sixteen threads take the same fresh lock at once; then sixteen take over the same stale
    one. Exactly one wins each time. (Not on moto: its conditional put checks, then writes.)"""
    url = str(tmp_path / "c") if kind == "local" else f"memory://lock-race/{uuid.uuid4().hex}"
    where = Where(kind, url, {})
    for stale in (False, True):
        if stale:
            where.plant(heartbeat=time.time() - 1000)
        won, refused = race(where, 16)
        assert len(won) == 1 and len(refused) == 15, (stale, len(won), refused[:1])
        assert where.raw()["run_id"] == won[0].owner.run_id
        won[0].release()


def test_local_lock_without_hard_links(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses hard links (some network and FUSE mounts) gets O_EXCL."""
    import errno

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    where = Where("local", str(tmp_path / "c"), {})
    with acquire(where) as lock:
        assert where.raw()["run_id"] == lock.owner.run_id
        with pytest.raises(CacheLockedError):
            acquire(where)
    assert where.raw() is None


def test_a_store_without_conditional_create_is_read_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a store whose create is not exclusive, a writer that raced us in is found by reading
    the lock back: we refuse rather than both writing."""
    from fsspec.implementations.memory import MemoryFileSystem

    where = Where("memory", f"memory://lock-plain/{uuid.uuid4().hex}", {})
    real = MemoryFileSystem.pipe_file
    rival = {"kdcache_lock": 1, "run_id": "f" * 32, "command": "kdcache build", "host": "rival",
             "pid": 7, "job": None, "acquired": time.time(), "heartbeat": time.time(),
             "stale_after": 300.0}  # fmt: skip

    def racing_pipe(self: Any, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> Any:
        out = real(self, path, value, mode="overwrite", **kw)  # "create" not honoured
        if path.endswith(LOCK_FILE) and json.loads(value)["host"] != "rival":
            real(self, path, json.dumps(rival).encode())  # the rival's write lands after ours
        return out

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", racing_pipe)
    with pytest.raises(CacheLockedError, match="pid 7 on rival"):
        acquire(where)
    assert where.raw()["host"] == "rival"


def test_a_create_whose_answer_was_lost_is_still_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store applied the create, the answer was lost, the client's retry was refused as a
    conflict: the lock found there is this writer's own, not another build's."""
    from fsspec.implementations.memory import MemoryFileSystem

    where = Where("memory", f"memory://lock-lost-answer/{uuid.uuid4().hex}", {})
    real = MemoryFileSystem.pipe_file

    def applied_then_refused(self: Any, path: str, value: bytes, mode: str = "overwrite") -> None:
        real(self, path, value, mode=mode)
        raise FileExistsError(path)  # what the retried request met

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", applied_then_refused)
    lock = acquire(where)
    assert where.raw()["run_id"] == lock.owner.run_id
    monkeypatch.undo()
    lock.release()
    assert where.raw() is None


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_a_writer_that_lost_its_lock_commits_nothing(tmp_path: Any, fmt: str) -> None:
    url = str(tmp_path / "c")
    lock = CacheLock.acquire(url, stale_after=0.5)
    writer = CacheWriter(url, draft(fmt), lock=lock)
    with writer.shard_writer(0) as w:
        w.write(random_records(writer.draft.layout, [5, 7], seed=0))
        writer.commit_shard(w)
    CacheLock.acquire(url, break_lock=True, notify=lambda _: None)
    wait_for(lambda: lost(lock))  # the holder's next heartbeat finds the breaker's lock
    with writer.shard_writer(1) as w:
        w.write(random_records(writer.draft.layout, [5, 7], seed=1))
        with pytest.raises(LockLostError):
            writer.commit_shard(w)
    assert sorted(p.name for p in (tmp_path / "c" / "commits").iterdir()) == ["000000.json"]
    with pytest.raises(LockLostError):
        writer.finalize(1)
    lock.release()
