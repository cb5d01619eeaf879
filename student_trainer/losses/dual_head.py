"""Dual-head KD (Yang et al., penghui-yang/DHKD): CE on the main head, BinaryKL-Norm on an aux head.

The student gets a second lm_head that shares the backbone. The main head (head 0, the one used
at inference) trains on cross-entropy only; the auxiliary head (head 1) trains on the logit-level
loss only. The paper's reason: CE and logit matching conflict in the linear classifier, not in
the backbone, so each head takes one of them and both feed the backbone.

BinaryKL-Norm, per class c with `sigma_c = sigmoid((s1_c - z_c) / tau)`:

    tau^2 * [1/2 log(1/2 / sigma_c) + 1/2 log(1/2 / (1 - sigma_c))] = KL(Bernoulli(1/2) || sigma_c)

summed over classes, mean over rows. It is 0 only at `s1_c = z_c`: it matches raw logits, so the
teacher side is `z_I = logprobs + lse`. From the cache the sum is restricted to the cached ids I
(approximate: classes outside I are left free); the teacher mass outside I goes to `stats`.
The official code clamps sigma to [1e-8, 1 - 1e-8]; here log-sigmoid keeps it exact instead.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def dual_head(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    aux_student: StudentLogits,
    temperature: float = 2.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """`gamma * CE(main head) + alpha * BinaryKL-Norm(aux head vs teacher on I)`, mean over rows.

    `student` is the main head, `aux_student` the auxiliary head at the same rows. Defaults:
    tau=2 and gamma=1 (DHKD), alpha=1 (CIFAR; ImageNet used 0.1 over 1000 classes, and the sum
    here runs over the k cached ids only).
    """
    labels = teacher.labels.unsqueeze(-1)  # (N, 1)
    ce = student.lse() - student.gather(labels).squeeze(-1)  # (N,)

    s1 = aux_student.gather(teacher.ids)  # (N, k)
    x = (s1 - teacher.logits.to(s1.dtype)) / temperature
    # 1/2 log(1/2 / sigma) + 1/2 log(1/2 / (1 - sigma)) = -log 2 - (log sigma + log(1 - sigma)) / 2
    per_class = -math.log(2.0) - 0.5 * (F.logsigmoid(x) + F.logsigmoid(-x))
    kd = temperature**2 * per_class.sum(-1)  # (N,)

    if stats is not None:
        stats["dual-head/ce"] = ce.mean().detach()
        stats["dual-head/kd"] = kd.mean().detach()
        stats["dual-head/teacher_tail_mass"] = teacher.log_tail.exp().mean().detach()
    return (gamma * ce + alpha * kd).mean()


SPECS: dict[str, LossSpec] = {
    "dual-head": LossSpec(
        dual_head,
        "Dual-head KD: CE on the main head + BinaryKL-Norm (tau=2) on an aux lm_head vs raw "
        "teacher logits; approximate: restricted to the cached ids",
        aux_head=True,
    ),
}
