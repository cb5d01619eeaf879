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


def test_kdtrainer_matches_kdcache_train_step_by_step(cache_url, tmp_path):
    student = tiny_student_config(tmp_path)
    out = tmp_path / "run"
    train(  # kdcache train's own loop, logging every step
        TrainConfig(
            cache=cache_url, student_config=str(student), out=str(out), loss="fkl-tail",
            max_steps=STEPS, batch_tokens=BATCH, seed=SEED, lr=LR, log_every=1, progress=False,
        )
    )  # fmt: skip
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [row["loss"] for row in logged if "loss" in row]

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(student.read_text()))
    torch.manual_seed(SEED)  # as kdcache train seeds a fresh student
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)  # its defaults
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(20, STEPS))
    args = kd_training_arguments(
        output_dir=str(tmp_path / "hf"), max_steps=STEPS, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=SEED, max_grad_norm=1.0, disable_tqdm=True,
    )  # fmt: skip
    trainer = KDTrainer(
        model=model,
        args=args,
        kd_loss="fkl-tail",
        train_dataset=cache_dataset(cache_url, seed=SEED, batch_tokens=BATCH),
        data_collator=KDCollator(open_cache(cache_url)),
        optimizers=(optimizer, schedule),
    )
    trainer.train()
    assert len(expected) == STEPS
    assert trainer.kd_losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected[-1] < expected[0]  # it trained: the comparison is not of a constant
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logs) == STEPS and logs[0]["kd_loss"] == pytest.approx(expected[0], rel=1e-5)


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
