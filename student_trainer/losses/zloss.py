"""Student-only terms the trainer mixes in beside a distillation loss: PaLM z-loss and label CE.

Both need only `student.lse()` (and one gather for the CE), so they run on a `ChunkedStudent`
without the [N, V] logits, and both are exact: no teacher signal is involved.
"""

from __future__ import annotations

from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def z_loss(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    coefficient: float = 1e-4,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """coefficient * mean (lse_S)^2 (PaLM; t5x `cross_entropy_with_logits` z_loss).

    Keeps the student's log-normaliser near 0. It acts on the raw logits, so `teacher` and
    `temperature` are accepted (every loss takes them) and ignored. Gradient per row:
    2 c lse softmax(s) / N. `stats["z-loss/mean_lse"]` is the mean student lse.
    """
    lse = student.lse()  # (N,)
    if stats is not None:
        stats["z-loss/mean_lse"] = lse.mean().detach()
    return coefficient * lse.square().mean()


def cross_entropy(student: StudentLogits, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy lse(s) - s_y for `labels` (N,) int64."""
    return -student.logprobs_at(labels.unsqueeze(-1)).squeeze(-1).mean()


def ce(
    student: StudentLogits, teacher: TeacherBatch, *, stats: dict[str, Tensor] | None = None
) -> Tensor:
    """Plain next-token cross-entropy on the cached labels: the SFT baseline, no teacher signal."""
    return cross_entropy(student, teacher.labels)


SPECS: dict[str, LossSpec] = {
    "ce": LossSpec(
        ce,
        "next-token cross-entropy only (SFT baseline): ignores the teacher, for comparisons",
        reads_topk=False,
    ),
    "z-loss": LossSpec(
        z_loss,
        "PaLM z-loss c * logsumexp(student logits)^2: a student-only regulariser, exact (no "
        "teacher); weight it in beside a distillation loss",
        reads_topk=False,
    ),
}
