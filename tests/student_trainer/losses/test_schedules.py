"""The papers' weight schedules: DKD's linear warm-up of its KD term, dual-head's KD stop; and
`kdcache train` handing the losses how far training has come."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student_trainer.batch import teacher_batch_from_logits
from student_trainer.losses import LOSSES
from student_trainer.losses._student import DenseStudent
from student_trainer.losses.dkd import dkd
from student_trainer.losses.dual_head import dual_head


def data(n: int = 6, v: int = 30):
    g = torch.Generator().manual_seed(0)
    teacher = teacher_batch_from_logits(
        torch.randn(n, v, generator=g) * 2, torch.randint(v, (n,), generator=g), 5
    )
    return teacher, torch.randn(n, v, generator=g), torch.randn(n, v, generator=g)


@pytest.mark.parametrize(("epoch", "weight"), [(0.0, 0.0), (0.5, 0.25), (2.0, 1.0), (7.0, 1.0)])
def test_dkd_warms_its_kd_term_up_linearly(epoch, weight):
    teacher, z, _ = data()
    full = dkd(DenseStudent(z), teacher, ce=0.0)
    ce_only = dkd(DenseStudent(z), teacher, ce=1.0) - full
    got = dkd(DenseStudent(z), teacher, ce=1.0, warmup_epochs=2.0, epoch=epoch)
    torch.testing.assert_close(got, ce_only + weight * full)


def test_dual_head_stops_its_kd_term():
    teacher, z, aux = data()
    before = dual_head(DenseStudent(z), teacher, aux_student=DenseStudent(aux), kd_until_epoch=1.0)
    stats: dict = {}
    after = dual_head(
        DenseStudent(z), teacher, aux_student=DenseStudent(aux), kd_until_epoch=1.0, epoch=1.0,
        stats=stats,
    )  # fmt: skip
    ce = dual_head(DenseStudent(z), teacher, aux_student=DenseStudent(aux), alpha_v=0.0)
    torch.testing.assert_close(after, ce)
    assert float(before) > float(after) and float(stats["dual-head/kd_on"]) == 0.0


def test_schedules_are_options_and_epoch_is_not():
    assert LOSSES["dkd"].scheduled and LOSSES["dual-head"].scheduled
    assert "warmup_epochs" in LOSSES["dkd"].options and "epoch" not in LOSSES["dkd"].options
    assert "kd_until_epoch" in LOSSES["dual-head"].options
    assert not LOSSES["fkl-tail"].scheduled


def test_kdcache_train_hands_the_epoch_to_the_loss(tiny_llama_dir: Path, tmp_path: Path):
    """DKD with a warm-up of 1000 epochs and no CE: step 1 (epoch 0) has loss 0 exactly, and
    the weight grows with the tokens seen."""
    from cache_builder import build
    from student_trainer import TrainConfig, train
    from tests.fixtures.caches import pydoc_jsonl, small_build_config
    from tests.fixtures.models import tiny_student_config

    data_file = pydoc_jsonl(tmp_path / "docs.jsonl", 3, 800)
    build(small_build_config(tiny_llama_dir, data_file, tmp_path / "cache"))
    train(  # kdcache train's own loop, logging every step
        TrainConfig(
            cache=str(tmp_path / "cache"), student_config=str(tiny_student_config(tmp_path)),
            out=str(tmp_path / "run"), loss="dkd",
            loss_options={"ce": 0.0, "warmup_epochs": 1000.0}, max_steps=2, batch_tokens=300,
            log_every=1, progress=False,
        )
    )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[0] == 0.0 and 0.0 < losses[1] < 1e-2  # a fresh student: DKD alone is ~1
