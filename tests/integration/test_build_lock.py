"""One writer per cache: the lock a build (and merge, split, subset) holds on its output, and
shard bytes on the disk before their commit record.

Builds run `python -m kdcache build` in fresh processes, as a user would, with the tiny teacher
and the small settings of `test_build_reliability` (many small shards, so that a build can be
killed in the middle).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from schemas import open_cache
from schemas.lock import LOCK_FILE, STALE_ENV, CacheLock
from schemas.validate import validate_cache
from tests.fixtures.cli import ENV, kdcache, one_line_error
from tests.integration.test_build_reliability import (
    assert_same_cache,
    build_here,
    cli_args,
    committed,
    write_docs,
)

pytestmark = [pytest.mark.integration, pytest.mark.reliability("concurrent-writers")]


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 7k tokens: 15 shards of the small settings, some 3 s of teacher work."""
    return write_docs(tmp_path_factory.mktemp("docs") / "docs.jsonl", 12, 1500)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, docs: Path) -> Path:
    return build_here(tmp_path_factory.mktemp("reference"), tiny_llama_dir, docs)


def build_cmd(teacher: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdcache",
        *cli_args(teacher, data, "cache"),
        "--no-progress",
        *extra,
    ]


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, cwd=cwd, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill_after_commits(proc: subprocess.Popen[str], cache: Path, n: int) -> None:
    """SIGKILL `proc` once it has committed `n` shards."""
    deadline = time.monotonic() + 120
    while committed(cache) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the build ended by itself: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def lock_of(cache: Path) -> dict[str, Any]:
    return json.loads((cache / LOCK_FILE).read_text())


def test_two_builds_on_one_out_one_refuses_at_once(
    tiny_llama_dir: Path, docs: Path, reference: Path, tmp_path: Path
) -> None:
    """Started together, one build takes the lock and the other refuses before it reads the
    data or loads the teacher; the winner's cache is the uninterrupted one."""
    cmd = build_cmd(tiny_llama_dir, docs)
    procs = [start(cmd, tmp_path), start(cmd, tmp_path)]
    ended: dict[int, float] = {}
    while len(ended) < 2:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.005)
    outs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], [o[1][-1500:] for o in outs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    line = one_line_error(
        subprocess.CompletedProcess(cmd, codes[loser], outs[loser][0], outs[loser][1])
    )
    assert "is locked by another build" in line, line
    assert f"pid {procs[winner].pid} on " in line and "last heartbeat" in line, line
    assert "--break-lock" in line, line
    assert ended[loser] < ended[winner], "the refused build waited for the other to finish"
    assert "resuming" not in outs[winner][1]
    cache = tmp_path / "cache"
    assert validate_cache(str(cache), deep=True) == []
    assert_same_cache(cache, reference)
    assert not (cache / LOCK_FILE).exists(), "released on success"


def test_a_killed_builds_lock_holds_until_broken(
    tiny_llama_dir: Path, docs: Path, reference: Path, tmp_path: Path
) -> None:
    """A SIGKILLed build leaves its lock (default stale time: minutes). A rerun refuses, before
    loading anything (its teacher does not even exist); `--break-lock` takes it at once and
    releases it when that run fails; the next run resumes to the uninterrupted cache."""
    cache = tmp_path / "cache"
    first = start(build_cmd(tiny_llama_dir, docs), tmp_path)
    kill_after_commits(first, cache, 2)
    left = lock_of(cache)
    assert left["pid"] == first.pid and left["stale_after"] == 300.0

    missing = tmp_path / "no-such-teacher"
    refused = kdcache(*cli_args(missing, docs, "cache"), "--no-progress", cwd=tmp_path, check=False)
    line = one_line_error(refused)
    assert "is locked by another build" in line and f"pid {first.pid} on " in line, line
    assert "since" in line and "UTC" in line and "stale after 300 s" in line, line
    assert lock_of(cache) == left, "a refused build touches nothing"

    broke = kdcache(
        *cli_args(missing, docs, "cache"),
        "--no-progress",
        "--break-lock",
        cwd=tmp_path,
        check=False,
    )
    line = one_line_error(broke)
    assert "breaking the lock" in broke.stderr and left["run_id"][:8] in broke.stderr
    assert "no-such-teacher" in line, "it got past the lock, to the teacher"
    assert not (cache / LOCK_FILE).exists(), "released on error"

    done = kdcache(*cli_args(tiny_llama_dir, docs, "cache"), "--no-progress", cwd=tmp_path)
    assert "resuming" in done.stderr
    assert "taking over" not in done.stderr and "breaking" not in done.stderr
    assert_same_cache(cache, reference)
    assert not (cache / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_on_rerun(
    tiny_llama_dir: Path, docs: Path, reference: Path, tmp_path: Path
) -> None:
    """With a stale time of 2 s (KDCACHE_LOCK_STALE_SECONDS), a killed build's lock is stale
    two seconds later, and a plain rerun takes it over, saying so."""
    cache = tmp_path / "cache"
    first = start(build_cmd(tiny_llama_dir, docs), tmp_path, **{STALE_ENV: "2"})
    kill_after_commits(first, cache, 2)
    left = lock_of(cache)
    assert left["stale_after"] == 2.0
    time.sleep(max(0.0, left["heartbeat"] + 2.2 - time.time()))
    done = kdcache(*cli_args(tiny_llama_dir, docs, "cache"), "--no-progress", cwd=tmp_path)
    assert "taking over a stale lock" in done.stderr and f"pid {first.pid} on " in done.stderr
    assert "resuming" in done.stderr
    assert_same_cache(cache, reference)
    assert not (cache / LOCK_FILE).exists()


def test_merge_split_subset_take_the_lock(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "derived"
    holder = CacheLock.acquire(str(out), command="kdcache build")
    try:
        for args in (
            ["subset", reference, "--max-tokens", "2000", "--out", out],
            ["merge", reference, reference, "--out", out],
            ["split", reference, "--val-fraction", "0.2", "--out-train", tmp_path / "t",
             "--out-val", out],
        ):  # fmt: skip
            line = one_line_error(kdcache(*args, check=False))
            assert "is locked by another build" in line and f"pid {os.getpid()} on " in line, line
            assert "--break-lock" in line
        assert not (tmp_path / "t").exists(), "split wrote nothing, and released its train output"
        broke = kdcache("subset", reference, "--max-tokens", "2000", "--out", out, "--break-lock")
        assert "breaking the lock" in broke.stderr and broke.stdout.startswith("subset into")
    finally:
        holder.release()
    assert open_cache(str(out), require_complete=True).manifest.num_tokens <= 2000
    assert validate_cache(str(out), deep=True) == []
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_shard_files_are_on_disk_before_their_commit_record(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Every file of a staged shard, every folder of it and `staging/` itself are fsynced
    before the commit record naming it is written: a power loss cannot leave a record pointing
    at data the disk never got."""
    import schemas.writer

    synced: set[str] = set()
    real_fsync, real_write = os.fsync, schemas.writer.write_bytes_atomic
    checked: list[str] = []

    def recording_fsync(fd: int) -> None:
        synced.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def checking_write(fs: Any, path: str, data: bytes) -> None:
        if "/commits/" in path:
            staged = Path(path).parent.parent / json.loads(data)["staged"]
            tree = [staged, *staged.rglob("*")] if staged.is_dir() else [staged]
            missing = [str(p) for p in [*tree, staged.parent] if os.path.realpath(p) not in synced]
            assert missing == [], f"not fsynced before {path}: {missing}"
            checked.append(path)
        real_write(fs, path, data)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(schemas.writer, "write_bytes_atomic", checking_write)
    data = write_docs(tmp_path / "few.jsonl", 3, 1200)
    cache = build_here(tmp_path / "w", tiny_llama_dir, data, format=fmt)
    shards = open_cache(str(cache), require_complete=True).shards
    assert len(checked) == len(shards) >= 3
