"""`student_trainer.hf.KDTrainer`: the same losses as `kdcache train`, step by step, and the
Trainer example run in one process and under a 2-process torchrun (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache_builder import build
from schemas import open_cache
from student_trainer import KDCollator, TrainConfig, cache_dataset, train
from student_trainer.hf import KDTrainer, kd_training_arguments
from student_trainer.train import _warmup_cosine
from tests.fixtures.caches import pydoc_jsonl, small_build_config
from tests.fixtures.cli import ENV, free_port
from tests.fixtures.models import tiny_student_config

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR, SEED, BATCH = 5, 3e-3, 5, 400


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> str:
    root = tmp_path_factory.mktemp("hf")
    data = pydoc_jsonl(root / "docs.jsonl", 8, 1200)
    build(small_build_config(tiny_llama_dir, data, root / "cache"))
    return str(root / "cache")


def fresh_student(student_config: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(student_config.read_text()))
    torch.manual_seed(SEED)  # as kdcache train seeds a fresh student
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def kd_trainer(model, cache_url: str, out: Path, steps: int, **args) -> KDTrainer:
    """A KDTrainer set up as `kdcache train` runs by default: AdamW with its weight decay, its
    warm-up and cosine schedule, clipping at 1."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(20, steps))
    settings = dict(
        output_dir=str(out), max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=SEED, max_grad_norm=1.0, disable_tqdm=True,
    )  # fmt: skip
    return KDTrainer(
        model=model,
        args=kd_training_arguments(**{**settings, **args}),
        kd_loss="fkl-tail",
        train_dataset=cache_dataset(cache_url, seed=SEED, batch_tokens=BATCH),
        data_collator=KDCollator(open_cache(cache_url)),
        optimizers=(optimizer, schedule),
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_kdtrainer_matches_kdcache_train_step_by_step(cache_url, tmp_path, accumulate):
    student = tiny_student_config(tmp_path)
    out = tmp_path / "run"
    train(  # kdcache train's own loop, logging every step
        TrainConfig(
            cache=cache_url, student_config=str(student), out=str(out), loss="fkl-tail",
            max_steps=STEPS, batch_tokens=BATCH, seed=SEED, lr=LR, log_every=1, progress=False,
            grad_accum=accumulate,
        )
    )  # fmt: skip
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [row["loss"] for row in logged if "loss" in row]

    trainer = kd_trainer(
        fresh_student(student), cache_url, tmp_path / "hf", STEPS,
        gradient_accumulation_steps=accumulate,
    )  # fmt: skip
    trainer.train()
    micro = trainer.kd_losses
    per_step = [
        sum(micro[i : i + accumulate]) / accumulate for i in range(0, len(micro), accumulate)
    ]
    assert len(expected) == STEPS
    assert per_step == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected[-1] < expected[0]  # it trained: the comparison is not of a constant
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logs) == STEPS and logs[0]["kd_loss"] == pytest.approx(expected[0], rel=1e-5)


def test_kdtrainer_resumes_at_the_same_place_in_the_cache(cache_url, tmp_path):
    """Trainer's checkpoint and resume: steps 4-6 of a resumed run are those of an unbroken one
    (weights, optimizer, schedule, and the data position, which the Trainer replays)."""
    student = tiny_student_config(tmp_path)
    whole = kd_trainer(fresh_student(student), cache_url, tmp_path / "a", 6)
    whole.train()
    broken = kd_trainer(
        fresh_student(student), cache_url, tmp_path / "b", 6, save_strategy="steps", save_steps=3
    )
    broken.train()
    resumed = kd_trainer(fresh_student(student), cache_url, tmp_path / "b", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert len(resumed.kd_losses) == 3
    assert resumed.kd_losses == pytest.approx(whole.kd_losses[3:], rel=1e-5, abs=1e-6)


def run_example(cmd: list[str]) -> list[float]:
    done = subprocess.run(
        cmd, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    return [float(line.split()[-1]) for line in lines if line.startswith("step ")]


def test_trainer_example_in_one_process(cache_url, tmp_path):
    example = str(ROOT / "examples" / "hf_trainer.py")
    losses = run_example([sys.executable, example, cache_url, str(tmp_path), "--steps", "10"])
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_trainer_example_under_torchrun(cache_url, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), str(ROOT / "examples" / "hf_trainer.py")]
    losses = run_example([*cmd, cache_url, str(tmp_path), "--steps", "10", "--batch-tokens", "512"])
    assert len(losses) == 2 and all(x == x for x in losses)  # rank 0 prints the log


def test_kdtrainer_under_bf16_autocast(cache_url, tmp_path):
    """The Trainer's bf16 (CPU autocast here): the student's body runs in bf16, the loss in
    float32 as `kdcache train` takes it, and training moves."""
    trainer = kd_trainer(
        fresh_student(tiny_student_config(tmp_path)), cache_url, tmp_path / "bf16", 4, bf16=True
    )
    trainer.train()
    losses = trainer.kd_losses
    assert len(losses) == 4 and all(x == x for x in losses) and losses[-1] < losses[0]
