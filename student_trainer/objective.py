"""The micro-batch's loss as the trainer computes it, from what the student's forward hands over.

`HiddenAndHead` (student.py) calls the objective with the final hidden states and the lm_head
(plus an auxiliary head). Per-token losses (`LossSpec.per_token`) run on dense blocks of rows,
each block's gradient taken in the same pass (`row_blocked_loss`: three lm_head products, as
plain CE, and never the [N, V] logits); losses that pool rows go once through the
vocabulary-chunked `ChunkedStudent`. `loss_of` adds the trainer's CE and z-loss terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from student_trainer.batch import TeacherBatch
from student_trainer.config import TrainConfig
from student_trainer.losses import LossSpec
from student_trainer.losses._rowblock import row_block_size, row_blocked_loss
from student_trainer.losses._student import ChunkedStudent, DenseStudent, StudentLogits
from student_trainer.losses.zloss import cross_entropy, z_loss
from student_trainer.student import Objective

__all__ = ["LossSettings", "loss_of", "objective_for"]


@dataclass(frozen=True)
class LossSettings:
    """What the loss takes from a run's settings, beside the loss's own options."""

    temperature: float | None = None
    """Distillation temperature (None: the loss's own default)."""
    ce_weight: float = 0.0
    """Weight of an added next-token cross-entropy term."""
    z_loss: float = 0.0
    """Coefficient of the z-loss on the student's log-sum-exp."""
    vocab_chunk: int = 8192
    """Vocabulary columns per step of the chunked student (losses that pool rows)."""
    logit_block: int = 1 << 24
    """Logits per row block of the per-token losses (rows = logit_block // V)."""
    epoch: float = 0.0
    """Epochs of training done when this step runs (tokens seen / tokens in the cache): what
    scheduled losses (DKD's warm-up, dual-head's KD stop) read."""

    @classmethod
    def of(cls, cfg: TrainConfig) -> LossSettings:
        return cls(
            temperature=cfg.temperature,
            ce_weight=cfg.ce_weight,
            z_loss=cfg.z_loss,
            vocab_chunk=cfg.vocab_chunk,
            logit_block=cfg.logit_block,
        )


def objective_for(
    spec: LossSpec,
    options: dict[str, Any],
    cfg: LossSettings,
    teacher: TeacherBatch,
    stats: dict[str, torch.Tensor],
    bf16: bool = False,
) -> Objective[torch.Tensor]:
    """The micro-batch's loss as a function of what `HiddenAndHead` computes in its forward.

    Per-token losses run on dense blocks of rows with their gradient taken in the same pass
    (three lm_head products, as plain CE, and no [N, V] logits); the others go once through the
    vocabulary-chunked student.
    """

    def objective(
        h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, aux: torch.Tensor | None
    ) -> torch.Tensor:
        if not spec.per_token:
            student = ChunkedStudent(h, weight, bias, vocab_chunk=cfg.vocab_chunk)
            aux_student = None if aux is None else student.with_head(aux)
            return loss_of(spec, options, cfg, student, teacher, aux_student, stats)
        shares: list[tuple[float, dict[str, torch.Tensor]]] = []

        def block_loss(hb, wb, bb, ab, *, rows: slice) -> torch.Tensor:
            # bf16 products where the step autocasts; the loss itself widens to float32
            with torch.autocast(hb.device.type, dtype=torch.bfloat16, enabled=bf16):
                z = F.linear(hb, wb, bb)
                za = None if ab is None else F.linear(hb, ab)
            seen: dict[str, torch.Tensor] = {}
            part = teacher.select(rows)
            aux_student = None if za is None else DenseStudent(za)
            loss = loss_of(spec, options, cfg, DenseStudent(z), part, aux_student, seen)
            shares.append(((rows.stop - rows.start) / h.shape[0], seen))
            return loss

        rows = row_block_size(weight.shape[0], cfg.logit_block)
        loss = row_blocked_loss(block_loss, h, weight, bias, aux, rows_per_block=rows)
        for key in shares[0][1] if shares else ():
            stats[key] = sum(share * seen[key].detach() for share, seen in shares)
        return loss

    return objective


def loss_of(
    spec: LossSpec,
    options: dict[str, Any],
    cfg: LossSettings,
    student: StudentLogits,
    teacher: TeacherBatch,
    aux_student: StudentLogits | None,
    stats: dict[str, torch.Tensor],
) -> torch.Tensor:
    kwargs = dict(options)
    if (
        cfg.temperature is not None
        and "temperature" in spec.options
        and "temperature" not in options
    ):
        kwargs["temperature"] = cfg.temperature
    if spec.aux_head:
        kwargs["aux_student"] = aux_student
    if spec.scheduled:
        kwargs["epoch"] = cfg.epoch
    loss = spec.fn(student, teacher, **kwargs, stats=stats)
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * cross_entropy(student, teacher.labels)
    if cfg.z_loss:
        loss = loss + z_loss(student, teacher, coefficient=cfg.z_loss)
    return loss
