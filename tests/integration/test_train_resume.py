"""`kdcache train --resume` as an operator meets it: killed runs (SIGKILL inside a checkpoint
save, and after a metrics row was logged but before the checkpoint that covers it) resume to
the outputs of an uninterrupted run; a finished run resumed reports what it finished with; a
command that changes what is trained is refused naming each changed setting, and the harmless
changes are taken.

Every run is the installed command in a fresh process. The student is a tiny Llama made wide
enough (d=256) that its checkpoint with AdamW state is ~16 MB: a save then lasts tens of
milliseconds, long enough for the test to see `checkpoint.pt.tmp` and kill the run inside it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.caches import pydoc_jsonl, small_build_config
from tests.fixtures.cli import ENV, kdcache, one_line_error
from tests.fixtures.models import tiny_student_config

pytestmark = pytest.mark.integration

STEPS = 6
CHECKPOINT_EVERY = 2
VARIES = {"tokens_per_s"}
"""Row keys that depend on the machine's speed, not on what was trained."""


@pytest.fixture(scope="module")
def caches(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A training cache (~3.5k tokens) and a smaller held-out cache, both of the tiny teacher."""
    from cache_builder import build

    root = tmp_path_factory.mktemp("resume-caches")
    out = {}
    for name, documents, chars in (("train", 8, 800), ("eval", 3, 400)):
        data = pydoc_jsonl(root / f"{name}.jsonl", documents, chars)
        settings = dict(max_length=48, shard_tokens=512, batch_tokens=192)
        build(small_build_config(tiny_llama_dir, data, root / name, **settings))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume-student")
    path = tiny_student_config(folder)
    config = json.loads(path.read_text())
    config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    config.update(num_attention_heads=4, num_key_value_heads=2)
    path.write_text(json.dumps(config))
    return path


def args(caches: dict[str, Path], student: Path, out: Path, *extra: str) -> list[str]:
    """The run every test starts: 6 steps, a checkpoint every 2, an evaluation every step (so
    every step logs a row)."""
    return ["train", "--cache", caches["train"], "--eval-cache", caches["eval"],
            "--student-config", student, "--out", out, "--max-steps", STEPS,
            "--checkpoint-every", CHECKPOINT_EVERY, "--eval-every", 1, "--batch-tokens", 128,
            "--warmup-steps", 2, "--lr", 1e-2, "--no-progress",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(caches, student, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    kdcache(*args(caches, student, out))
    return out


def rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse_constant) for line in lines]


def refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def result(out: Path) -> dict[str, Any]:
    """result.json, parsed as strict JSON: NaN or Infinity in it fail the test."""
    return json.loads((out / "result.json").read_text(), parse_constant=refuse_constant)


def same_rows(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in VARIES} for row in rows(out)]


def assert_same_outputs(out: Path, reference: Path) -> None:
    """metrics.jsonl holds the uninterrupted run's rows (same steps, losses, evaluations, each
    once) and result.json its figures; no checkpoint temporary is left."""
    assert same_rows(out) == same_rows(reference)
    got, want = result(out), result(reference)
    for key in ("steps", "tokens", "final_loss", "eval", "approximations", "bad_shards"):
        assert got[key] == want[key], key
    assert isinstance(got["final_loss"], float) and math.isfinite(got["final_loss"])
    assert got["approximations"], "the loss reports its approximation statistics"
    assert 0 < got["seconds"] < 600
    assert not (out / "checkpoint.pt.tmp").exists()


def run_and_kill(command: list[Any], when: Callable[[], bool]) -> None:
    """Start `kdcache COMMAND`; SIGKILL it as soon as `when()` holds (polled every ms)."""
    cmd = [sys.executable, "-m", "kdcache", *map(str, command)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and not when():
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == -signal.SIGKILL, f"the run ended by itself (status {status}) before the kill"


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.reliability("train-kill")
def test_a_kill_inside_a_checkpoint_save_resumes_to_the_uninterrupted_outputs(
    caches, student, reference, tmp_path
) -> None:
    out = tmp_path / "run"
    tmp, checkpoint = out / "checkpoint.pt.tmp", out / "checkpoint.pt"
    # The second save (step 4): the first checkpoint exists, the new one is being written.
    run_and_kill(args(caches, student, out), lambda: tmp.exists() and checkpoint.exists())
    assert tmp.exists(), "the kill landed outside the save"
    assert logged_steps(out)[-1] == 4, "rows 3 and 4 were logged after the kept checkpoint"

    kdcache(*args(caches, student, out, "--resume"))
    assert_same_outputs(out, reference)


@pytest.mark.reliability("train-kill")
def test_a_kill_after_a_logged_row_resumes_with_allowed_changes_to_the_same_outputs(
    caches, student, reference, tmp_path
) -> None:
    """Killed after step 3's row, before step 4's checkpoint; resumed from a copy of the run
    directory, with a moved copy of each cache and every harmless setting changed."""
    killed = tmp_path / "killed"
    run_and_kill(args(caches, student, killed), lambda: 3 in logged_steps(killed))
    assert logged_steps(killed)[-1] == 3, "the kill came after the next checkpoint"

    out, moved = tmp_path / "elsewhere" / "run", tmp_path / "moved"
    shutil.copytree(killed, out)
    shutil.copytree(caches["train"], moved / "train")
    shutil.copytree(caches["eval"], moved / "eval")
    harmless = ["--checkpoint-every", "1", "--num-workers", "1", "--device", "cpu",
                "--progress", "--skip-bad-shards", "--allow-vocab-extension"]  # fmt: skip
    copies = {"train": moved / "train", "eval": moved / "eval"}
    run = kdcache(*args(copies, student, out, "--resume", *harmless))
    assert "resumed from step 2" in run.stderr
    assert_same_outputs(out, reference)
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["cache"] == str(moved / "train") and recorded["checkpoint_every"] == 1
    assert recorded["num_workers"] == 1 and recorded["progress"] is True


def test_resuming_a_finished_run_reports_what_it_finished_with(
    caches, student, reference, tmp_path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    run = kdcache(*args(caches, student, out, "--resume", "--eval-every", "2"))
    assert f"resumed from step {STEPS}" in run.stderr
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert_same_outputs(out, reference)
    assert result(out)["seconds"] == result(reference)["seconds"], "no training time was added"
    assert f"final loss {result(reference)['final_loss']:.4f}" in run.stdout
    assert json.loads((out / "train_config.json").read_text())["eval_every"] == 2


CHANGES = {
    "--seed": ("0", "1"),
    "--loss": ("fkl", "rkl"),
    "--lr": ("0.01", "0.02"),
    "--max-steps": ("6", "8"),
    "--batch-tokens": ("128", "96"),
    "--grad-accum": ("1", "2"),
    "--clip": ("1.0", "0.5"),
    "--warmup-steps": ("2", "3"),
    "--weight-decay": ("0.01", "0.0"),
    "--ce-weight": ("0.0", "0.1"),
    "--z-loss": ("0.0", "0.0001"),
    "--temperature": ("unset", "2.0"),
    "--shuffle-buffer": ("1024", "8"),
    "--logit-block": ("16777216", "4096"),
}
"""Settings that change what is trained: (the value the run had, the one the resume asks for)."""


@pytest.mark.reliability("resume-changes")
def test_a_resume_that_changes_what_is_trained_is_refused_naming_each_change(
    caches, student, reference, tmp_path, trials
) -> None:
    trials(len(CHANGES) + 4)  # and the student config, both caches and a loss option
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = tmp_path / "other.json"
    other.write_text(student.read_text().replace("256", "128"))
    changed = [x for flag, (_, new) in CHANGES.items() for x in (flag, new)]
    swapped = {"train": caches["eval"], "eval": caches["train"]}
    command = args(swapped, student, out, "--resume", *changed, "--loss-option", "temperature=3")
    command[command.index("--student-config") + 1] = other
    line = one_line_error(kdcache(*command, check=False))

    assert "--resume" in line and str(out) in line, line
    for flag, (old, new) in CHANGES.items():
        assert f"{flag} {old} -> {new}" in line, (flag, line)
    assert "--loss-option" in line and "temperature" in line, line
    assert f"--student-config {student} -> {other}" in line, line
    assert f"--cache {caches['train']}" in line and f"-> {caches['eval']}" in line, line
    assert f"--eval-cache {caches['eval']}" in line and f"-> {caches['train']}" in line, line
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before, "a refused resume must leave the run untouched"


def assert_same_state(out: Path, reference: Path) -> None:
    """The final checkpoints hold the same weights and optimizer state, tensor for tensor."""
    import torch

    got, want = (torch.load(p / "checkpoint.pt", weights_only=False) for p in (out, reference))
    assert got["progress"]["step"] == want["progress"]["step"] == STEPS
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), f"weight {name} differs"
    groups = [json.dumps(o["optimizer"]["param_groups"], sort_keys=True) for o in (got, want)]
    assert groups[0] == groups[1]  # as JSON: a restored group holds its betas as a list
    for key, state in want["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(got["optimizer"]["state"][key][name], tensor), (key, name)


def after(condition: Callable[[], bool], seconds: float) -> Callable[[], bool]:
    """True `seconds` after `condition()` was first seen true."""
    seen: list[float] = []

    def check() -> bool:
        if not seen and condition():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= seconds

    return check


LONG_KILLS = [
    pytest.param(
        seed, id=f"seed{seed}", marks=[pytest.mark.long, pytest.mark.reliability("train-kill")]
    )
    for seed in range(12)
]


@pytest.mark.parametrize("seed", LONG_KILLS)
def test_a_training_killed_at_a_random_moment_resumes_to_the_same_weights(
    seed: int, caches, student, reference, tmp_path, trials: Callable[[int], None]
) -> None:
    """Even seeds: SIGKILL inside the first or second checkpoint save. Odd seeds: a random
    time after a random step's row was logged."""
    trials(1)
    rng = random.Random(seed)
    out = tmp_path / "run"
    tmp, checkpoint = out / "checkpoint.pt.tmp", out / "checkpoint.pt"
    if seed % 2 == 0:
        second = rng.random() < 0.5
        when = lambda: tmp.exists() and checkpoint.exists() == second  # noqa: E731
    else:
        row = rng.randint(1, STEPS - 2)
        when = after(lambda: row in logged_steps(out), rng.uniform(0.0, 0.1))
    run_and_kill(args(caches, student, out), when)

    # Killed inside the first save, the run has no checkpoint: it is started again, which
    # must not keep the killed run's rows.
    kdcache(*args(caches, student, out, *(["--resume"] if checkpoint.exists() else [])))
    assert_same_outputs(out, reference)
    assert_same_state(out, reference)
