"""Stage one under stress: SIGKILL at random moments, torchrun over two ranks, a full disk, bad
teachers and tokenizers, and what the command prints while it works.

The builds run a tiny random Llama over local text, cut into many small shards so that a
subprocess can be killed in the middle of a build. Subprocesses run `python -m kdcache build`
exactly as a user would, single-threaded (two cores are shared on CI).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cache_builder import BuildConfig, build
from cache_builder.distributed import Ranks
from kdcache.cli import main
from schemas import open_cache
from schemas.errors import ConfigError
from schemas.validate import validate_cache
from tests.fixtures.models import make_tiny_llama, make_tokenizer, save_tiny_model

pytestmark = pytest.mark.integration

SETTINGS = dict(max_length=64, top_k=8, shard_tokens=512, batch_tokens=128)
"""Small rows, small batches, many small shards: a build that can be killed mid-way."""

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def write_docs(path: Path, count: int, chars: int) -> Path:
    import pydoc_data.topics as topics

    with path.open("w") as f:
        for _, text in sorted(topics.topics.items())[:count]:
            f.write(json.dumps({"text": text[:chars]}) + "\n")
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 7k tokens: 15 shards of SETTINGS."""
    return write_docs(tmp_path_factory.mktemp("docs") / "docs.jsonl", 12, 1500)


@pytest.fixture(scope="module")
def few_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2.5k tokens: five shards of SETTINGS, for the error paths."""
    return write_docs(tmp_path_factory.mktemp("few") / "few.jsonl", 4, 1500)


def cli_args(teacher: Path, data: Path, out: str, **overrides: object) -> list[str]:
    opts = {**SETTINGS, **overrides}
    args = ["build", "--teacher", str(teacher), "--dataset", str(data), "--out", out]
    for key, value in opts.items():
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [f"--{key.replace('_', '-')}", shown]
    return args


def build_here(workdir: Path, teacher: Path, data: Path, **overrides: object) -> Path:
    """An uninterrupted in-process build into `workdir/cache` (the relative --out "cache", so
    that the manifests of builds in different folders can be compared byte for byte)."""
    workdir.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(workdir)
    try:
        settings = {**SETTINGS, **overrides}
        build(
            BuildConfig(
                out="cache", teacher=str(teacher), dataset=str(data), progress=False, **settings
            )
        )
    finally:
        os.chdir(here)
    return workdir / "cache"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, docs: Path) -> Path:
    return build_here(tmp_path_factory.mktemp("reference"), tiny_llama_dir, docs)


def temporaries(cache: Path) -> list[str]:
    """Atomic-write temporaries and staged shards left anywhere in the cache."""
    staged = list((cache / "staging").iterdir()) if (cache / "staging").is_dir() else []
    return sorted(str(p.relative_to(cache)) for p in [*cache.rglob(".tmp-*"), *staged])


def uncommitted_in_shards(cache: Path) -> list[str]:
    """Shards in shards/ without a commit record (listed first, so a concurrent commit
    cannot make one look uncommitted)."""
    shards = (
        sorted(p.name for p in (cache / "shards").iterdir()) if (cache / "shards").is_dir() else []
    )
    records = (
        {p.stem for p in (cache / "commits").glob("*.json")}
        if (cache / "commits").is_dir()
        else set()
    )
    return [name for name in shards if name.split(".")[0] not in records]


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Same manifest bytes, every listed shard intact, nothing else in shards/, no temporaries."""
    assert (cache / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert validate_cache(str(cache)) == []  # sizes and checksums of every shard, on disk
    listed = {s.name for s in open_cache(str(cache), require_complete=True).shards}
    assert {f"shards/{p.name}" for p in (cache / "shards").iterdir()} == listed
    assert temporaries(cache) == []


def _json_block(value: dict) -> str:
    """How a small dict nested three deep in manifest.json is written."""
    return json.dumps(value, indent=2).replace("\n", "\n      ")


def one_error_line(output: str) -> str:
    """The CLI's failure output: no traceback, exactly one line, the last, starting "Error:"."""
    lines = output.strip().splitlines()
    assert "Traceback" not in output, output
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], output
    return lines[-1]


# -- 1. crash safety ---------------------------------------------------------------------------


def committed(cache: Path) -> int:
    folder = cache / "commits"
    return len(list(folder.glob("[0-9]*.json"))) if folder.is_dir() else 0


def writing(cache: Path) -> bool:
    """Has this run started writing shards (a staged shard exists)?"""
    staging = cache / "staging"
    return staging.is_dir() and any(staging.iterdir())


def run_and_kill(
    cmd: list[str], cwd: Path, cache: Path, when: Callable[[], bool], fraction: float
) -> tuple[int, int]:
    """Start `cmd`; once `when()` holds, SIGKILL it `fraction` of a shard's time later.

    A shard's time is the last interval between two commits seen in this run (0.05 s before
    two are seen), so the kill lands at the same point of the build however busy the machine
    is. Returns (exit status, shards committed at the kill).
    """
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        seen = [(committed(cache), time.monotonic())]
        deadline = time.monotonic() + 120
        while proc.poll() is None and not when() and time.monotonic() < deadline:
            time.sleep(0.002)
            if committed(cache) != seen[-1][0]:
                seen.append((committed(cache), time.monotonic()))
        interval = seen[-1][1] - seen[-2][1] if len(seen) > 2 else 0.05
        time.sleep(fraction * interval)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60), committed(cache)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.reliability("build-kill-zarr")
def test_sigkill_at_random_moments_then_resume_gives_the_same_cache(
    tiny_llama_dir: Path, docs: Path, reference: Path, tmp_path: Path, trials: Callable[[int], None]
) -> None:
    trials(3)
    n = len(open_cache(str(reference)).shards)
    assert n >= 12, "the build needs many shards to be killed in the middle"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "kdcache", *cli_args(tiny_llama_dir, docs, "cache")]
    # Each run after the first follows a SIGKILLed one, whose lock would hold --out for its
    # stale time (test_build_lock.py): the operator who killed it breaks it.
    cmd += ["--no-progress", "--break-lock"]
    rng = random.Random(20240611)

    def reached(goal: int) -> Callable[[], bool]:
        return lambda: committed(cache) >= goal

    # Three runs, each killed at a random fraction of a shard after an event: the first shard
    # temporary (the build has just started on its shards); a random number of commits later;
    # three shards from the end.
    kills = []
    for label in ("early", "random", "late"):
        before = committed(cache)
        if label == "early":
            when = functools.partial(writing, cache)
        elif label == "random":
            when = reached(before + rng.randint(2, max(2, (n - 4 - before) // 2)))
        else:
            when = reached(max(before + 2, n - 3))
        status, after = run_and_kill(cmd, tmp_path, cache, when, rng.uniform(0.0, 0.9))
        assert status == -signal.SIGKILL, f"the {label} run ended by itself with status {status}"
        assert uncommitted_in_shards(cache) == [], f"killed {label}: a glob would see these"
        kills.append((label, before, after))
    rerun = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {kills[-1][2]} of {n} shards are already committed" in rerun.stderr

    (_, _, early), (_, before, middle), (_, _, last) = kills
    assert early < n // 3, f"the early kill came after {early} of {n} shards: {kills}"
    assert before < middle < n - 3, kills
    assert n - 3 <= last < n, kills
    assert_same_cache(cache, reference)


VARIANTS = {"plain": {}, "sampled": dict(samples=4, temperatures=(2.0,))}
"""What the long kill runs build: odd seeds also draw samples and store a second temperature."""


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, docs: Path) -> Any:
    """`references(fmt, variant)`: the uninterrupted build of those settings, made once."""
    made: dict[tuple[str, str], Path] = {}

    def get(fmt: str, variant: str) -> Path:
        if (fmt, variant) not in made:
            workdir = tmp_path_factory.mktemp(f"reference-{fmt}-{variant}")
            overrides = {"format": fmt, **VARIANTS[variant]}
            made[fmt, variant] = build_here(workdir, tiny_llama_dir, docs, **overrides)
        return made[fmt, variant]

    return get


def started(seconds: float) -> Callable[[], bool]:
    """True `seconds` after this call: a kill while the run imports, loads or tokenizes."""
    at = time.monotonic() + seconds
    return lambda: time.monotonic() >= at


LONG_KILLS = [
    pytest.param(
        fmt,
        seed,
        id=f"{fmt}-{seed}",
        marks=[pytest.mark.long, pytest.mark.reliability(f"build-kill-{fmt}")],
    )
    for fmt in ("arrow", "zarr")
    for seed in range(20)
]


@pytest.mark.parametrize("fmt,seed", LONG_KILLS)
def test_a_build_killed_at_random_moments_resumes_to_the_same_cache(
    fmt: str, seed: int, references: Any, trials: Callable[[int], None],
    tiny_llama_dir: Path, docs: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """One build, SIGKILLed once (a third of the seeds: twice) at a random moment: while it
    starts, as its first shard is staged, or a random fraction of a shard after a random
    commit; then rerun to the end."""
    rng = random.Random(1000 * seed + len(fmt))
    variant = "sampled" if seed % 2 else "plain"
    reference = references(fmt, variant)
    n = len(open_cache(str(reference)).shards)
    kills = 2 if seed % 3 == 0 else 1
    trials(kills)
    cache = tmp_path / "cache"
    settings = {"format": fmt, **VARIANTS[variant]}
    cmd = [sys.executable, "-m", "kdcache", *cli_args(tiny_llama_dir, docs, "cache", **settings)]
    cmd += ["--no-progress", "--break-lock"]
    for left in reversed(range(kills)):  # shards kept for the kills still to come
        before = committed(cache)
        moment = rng.choice(["starting", "staging", "after a commit"])
        if moment == "starting":
            when = started(rng.uniform(0.2, 3.0))
        elif moment == "staging":
            when = functools.partial(writing, cache)
        else:
            goal = rng.randint(before + 1, max(before + 1, n - 3 - 5 * left))
            when = lambda goal=goal: committed(cache) >= goal  # noqa: E731
        status, _ = run_and_kill(cmd, tmp_path, cache, when, rng.uniform(0.0, 0.9))
        assert status == -signal.SIGKILL, f"the run killed {moment} ended by itself ({status})"
        assert uncommitted_in_shards(cache) == [], f"killed {moment}: a glob would see these"
    rerun = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_cache(cache, reference)


def test_a_commit_half_written_by_a_killed_run_does_not_stop_the_resume(
    tiny_llama_dir: Path, few_docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill inside an atomic write leaves its `.tmp-*` file; a rerun must not read it."""
    import shutil

    want = build_here(tmp_path / "want", tiny_llama_dir, few_docs)
    n = len(open_cache(str(want)).shards)
    cache = tmp_path / "got" / "cache"
    shutil.copytree(want, cache)
    (cache / "commits" / "000003.json").unlink()  # shard 3 was never committed ...
    (cache / "commits" / ".tmp-0badf00d-000003.json").write_text('{"name": "sha')  # ... mid-write
    (cache / ".tmp-0badf00d-manifest.json").write_text("")
    (cache / "tokenizer" / ".tmp-0badf00d-tokenizer.json").write_text("{")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["status"] = "building"
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != 3]
    (cache / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.chdir(tmp_path / "got")
    result = CliRunner().invoke(
        main, [*cli_args(tiny_llama_dir, few_docs, "cache"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert f"resuming: {n - 1} of {n} shards" in result.output
    assert_same_cache(cache, want)


# -- 2. torchrun -----------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_ranks_equal_one_process(
    tiny_llama_dir: Path, docs: Path, reference: Path, tmp_path: Path
) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "kdcache"]
    cmd += [*cli_args(tiny_llama_dir, docs, "cache"), "--no-progress"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = open_cache(str(tmp_path / "cache")), open_cache(str(reference))
    assert two.complete and len(two.shards) == len(one.shards) > 2
    for i in range(len(one.shards)):
        assert two.read_shard(i).equals(one.read_shard(i)), f"shard {i} differs"
    assert two.manifest.shards == one.manifest.shards
    # byte for byte, but for the parallel layout the manifest records (how, not what)
    layout = two.manifest.build.config["parallel"]
    assert layout == {"tp": 1, "dp": 2, "world_size": 2, "device_map": None}
    manifest = tmp_path / "cache" / "manifest.json"
    one_rank = {**layout, "dp": 1, "world_size": 1}
    manifest.write_text(manifest.read_text().replace(_json_block(layout), _json_block(one_rank)))
    assert_same_cache(tmp_path / "cache", reference)
    # Each rank wrote the shards the plan gives it: rank 1 the odd ones.
    rank1 = re.search(r"^rank 1: (\d+) tokens through the teacher", done.stdout, re.M)
    assert rank1, done.stdout
    assert int(rank1[1]) == sum(s.num_tokens for s in one.shards if s.index % 2 == 1)
    assert re.search(r"^built cache: \d+ tokens in \d+ shards", done.stdout, re.M), done.stdout


def test_rank_setup_refuses_master_port_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun --master-port 0` hands port 0 to every rank, which then wait forever."""
    for key, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_PORT="0").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"--master-port 0.*--standalone"):
        Ranks.from_env()


def test_ranks_wait_long_enough_for_a_resumed_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a resume, rank 0 may wait at the last barrier for another rank's whole share: the
    default 30 minutes of torch.distributed would kill a long build there."""
    import torch.distributed as dist

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    assert Ranks.from_env() == Ranks(0, 2, 0)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() >= 24 * 3600


# -- 3. errors: one line, no traceback, nothing half-listed --------------------------------------


def test_unwritable_output_is_one_line(
    tiny_llama_dir: Path, few_docs: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "cache"
    result = CliRunner().invoke(
        main, [*cli_args(tiny_llama_dir, few_docs, str(out)), "--no-progress"]
    )
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert str(out) in line and "Not a directory" in line and "Fix:" in line


def test_disk_full_lists_only_whole_shards_and_a_rerun_completes(
    tiny_llama_dir: Path, few_docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fsspec.implementations.local import LocalFileOpener

    want = build_here(tmp_path / "want", tiny_llama_dir, few_docs, format="arrow")
    n = len(open_cache(str(want)).shards)
    real_write = LocalFileOpener.write

    def full_at_shard_2(self: LocalFileOpener, data: bytes) -> int:
        if "/staging/000002-" in self.path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", full_at_shard_2)
    monkeypatch.chdir(tmp_path)
    args = [*cli_args(tiny_llama_dir, few_docs, "cache", format="arrow"), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert "No space left on device" in line and "resumes" in line

    half = open_cache("cache")
    assert half.manifest.status == "building"
    assert [s.index for s in half.shards] == [0, 1]
    assert sorted(p.name for p in Path("cache/commits").iterdir()) == ["000000.json", "000001.json"]
    for info in half.shards:  # every listed shard is whole: size, checksum, records
        assert half.read_shard(info).equals(open_cache(str(want)).read_shard(info.index))

    monkeypatch.setattr(LocalFileOpener, "write", real_write)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"resuming: 2 of {n} shards" in result.output
    assert_same_cache(tmp_path / "cache", want)


@pytest.fixture(scope="module")
def big_vocab_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with 70,000 output ids (more than uint16 holds), tiny otherwise."""
    from transformers import LlamaConfig

    tokenizer = make_tokenizer(384)  # the vocabulary's first 384 ids are the text's tokens
    config = LlamaConfig(
        vocab_size=70_000,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return save_tiny_model(tmp_path_factory.mktemp("v70k"), config, tokenizer=tokenizer)


def test_vocab_too_large_for_uint16_ids(
    big_vocab_teacher: Path, few_docs: Path, tmp_path: Path
) -> None:
    args = cli_args(big_vocab_teacher, few_docs, str(tmp_path / "c"), id_encoding="uint16")
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert "uint16" in line and "70000" in line and "--id-encoding" in line
    assert not (tmp_path / "c").exists(), "nothing is written for a build that cannot be stored"


@pytest.fixture(scope="module")
def nan_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with NaN in one row of its lm_head: every position's logits hold a NaN."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_llama(tmp_path_factory.mktemp("nan"), num_hidden_layers=1)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"][7] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_nan_logits_stop_the_build_naming_the_shard_and_batch(
    nan_teacher: Path, few_docs: Path, tmp_path: Path
) -> None:
    # One batch per shard: the commit of shard 0 is queued right behind its failing batch.
    out = tmp_path / "c"
    args = cli_args(nan_teacher, few_docs, str(out), shard_tokens=256, batch_tokens=256)
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert re.search(r"Error: shard 0 batch 0: the teacher's logits .* NaN or inf", line), line
    assert "--dtype float32" in line
    assert open_cache(str(out)).shards == ()
    assert not (out / "commits").exists(), "a shard whose batch failed must never be committed"


def retokenize(teacher: Path, target: Path, **special: str) -> Path:
    """A copy of `teacher` whose tokenizer has only the `special` tokens given."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(teacher, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / name).unlink(missing_ok=True)
    backend = Tokenizer.from_str(make_tokenizer(384).backend_tokenizer.to_str())
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(target)
    return target


def test_tokenizer_without_eos_is_one_line(
    tiny_llama_dir: Path, few_docs: Path, tmp_path: Path
) -> None:
    teacher = retokenize(tiny_llama_dir, tmp_path / "t")
    args = cli_args(teacher, few_docs, str(tmp_path / "c"))
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert "no eos_token" in line and "Fix:" in line


def test_tokenizer_without_pad_borrows_eos_and_says_so(
    tiny_llama_dir: Path, few_docs: Path, tmp_path: Path
) -> None:
    teacher = retokenize(tiny_llama_dir, tmp_path / "t", eos_token="<|endoftext|>")
    args = cli_args(teacher, few_docs, str(tmp_path / "c"))
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "has no pad_token; using eos_token" in result.output
    assert open_cache(str(tmp_path / "c")).manifest.tokenizer.pad_token_id == 0


@pytest.mark.parametrize("case", ["remote-code", "unknown-architecture"])
def test_teacher_transformers_cannot_load_is_one_line(
    tiny_llama_dir: Path, few_docs: Path, tmp_path: Path, case: str
) -> None:
    teacher = retokenize(tiny_llama_dir, tmp_path / "t", eos_token="<|endoftext|>")
    config = json.loads((teacher / "config.json").read_text())
    config["model_type"] = "kdcache-custom"
    if case == "remote-code":  # its own modelling code, named in config.json
        config["auto_map"] = {"AutoConfig": "config.C", "AutoModelForCausalLM": "model.M"}
    (teacher / "config.json").write_text(json.dumps(config))
    args = [*cli_args(teacher, few_docs, str(tmp_path / "c")), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert str(teacher) in line
    if case == "remote-code":
        assert "--trust-remote-code" in line
    else:
        assert "kdcache-custom" in line


# -- 4. what the command prints -------------------------------------------------------------------


def test_progress_bar_and_summary(tiny_llama_dir: Path, few_docs: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = CliRunner().invoke(main, [*cli_args(tiny_llama_dir, few_docs, str(out)), "--progress"])
    assert result.exit_code == 0, result.output
    # tqdm's last refresh: tokens done/total, elapsed<ETA and the rate, on stderr.
    assert re.search(
        r"build: 100%.*\d+(\.\d+)?k?/\d+(\.\d+)?k? \[\d\d:\d\d<\d\d:\d\d, +[\d.]+k?tok/s\]",
        result.stderr,
    ), result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"built (\S+): (\d+) tokens in (\d+) shards, ([\d.]+) bytes/token; "
        r"(\d+) tokens through the teacher in ([\d.]+) s \(([\d,]+) tokens/s\)",
        summary,
    )
    assert m, summary
    cache = open_cache(str(out))
    assert m[1] == str(out) and int(m[2]) == int(m[5]) == cache.manifest.num_tokens
    assert int(m[3]) == len(cache.shards) and float(m[4]) == pytest.approx(
        cache.manifest.nbytes / cache.manifest.num_tokens, abs=0.05
    )
    assert float(m[6]) > 0 and int(m[7].replace(",", "")) > 0
    again = CliRunner().invoke(main, [*cli_args(tiny_llama_dir, few_docs, str(out)), "--progress"])
    assert again.exit_code == 0 and "already complete" in again.stdout
