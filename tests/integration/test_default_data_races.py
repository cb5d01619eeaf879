"""Builds of the embedded default corpus that run at the same time: two `kdcache build` processes
on one machine, and the two ranks of one `torchrun` build. They once wrote the corpus to one
shared temporary file, and one of them lost.

Every process gets the same private TMPDIR, so the runs meet there as they would in /tmp.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import open_cache
from schemas.validate import validate_cache
from tests.fixtures.cli import ENV

pytestmark = pytest.mark.integration

SETTINGS = ["--max-documents", "3", "--max-length", "64", "--top-k", "4"]
SETTINGS += ["--shard-tokens", "1024", "--batch-tokens", "512", "--no-progress"]


def kdcache_cmd() -> list[str]:
    return [sys.executable, "-m", "kdcache"]


def start(cmd: list[str], cwd: Path, tmpdir: Path) -> subprocess.Popen[str]:
    env = {**ENV, "TMPDIR": str(tmpdir)}
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def leftovers(tmpdir: Path) -> list[str]:
    return sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two default builds started together, into two caches, sharing one TMPDIR."""
    root = tmp_path_factory.mktemp("pair")
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    procs = [
        start([*kdcache_cmd(), "build", "--out", name, *SETTINGS], root, tmpdir)
        for name in ("one", "two")
    ]
    for proc in procs:
        finish(proc)
    return root / "one", root / "two", tmpdir


def test_two_default_builds_at_once_both_succeed_alike(pair: tuple[Path, Path, Path]) -> None:
    one, two, tmpdir = pair
    for cache in (one, two):
        assert validate_cache(str(cache), deep=True) == []
    a, b = open_cache(str(one)).manifest, open_cache(str(two)).manifest
    assert a.dataset.source == "embedded:python-docs:train"
    assert a.dataset.num_documents == 3
    assert (a.dataset, a.shards) == (b.dataset, b.shards)
    assert leftovers(tmpdir) == []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_ranks_on_the_default_corpus(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    one, _, _ = pair
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "kdcache", "build", "--out", "c", *SETTINGS]
    out = finish(start(cmd, tmp_path, tmpdir))
    assert "rank 1:" in out and "built c:" in out, out
    assert validate_cache(str(tmp_path / "c"), deep=True) == []
    two_ranks, one_process = open_cache(str(tmp_path / "c")).manifest, open_cache(str(one)).manifest
    assert len(one_process.shards) >= 2  # both ranks had shards to write
    assert (two_ranks.dataset, two_ranks.shards) == (one_process.dataset, one_process.shards)
    assert leftovers(tmpdir) == []


def test_write_default_dataset_from_many_processes_at_once(tmp_path: Path) -> None:
    """The public writer also takes concurrent callers: each writes its own temporary file."""
    code = (
        "import sys; from cache_builder.default import write_default_dataset; "
        "print(write_default_dataset(sys.argv[1], 'validation'))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "data")],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    paths = {finish(proc).strip() for proc in procs}
    assert paths == {str(tmp_path / "data" / "default-validation.jsonl")}
    assert os.listdir(tmp_path / "data") == ["default-validation.jsonl"]
