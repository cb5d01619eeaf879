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

Weighting. The official runs weight the class-summed term by alpha = 1 on CIFAR-100 and 0.1 on
ImageNet (penghui-yang/DHKD README, `-a`): alpha times the number of classes is 100 in both, a
weight of 100 / C per class term. `alpha_v` is that product, so the KD weight per class is
`alpha_v / V` with V the vocabulary (the student's class count), and the defaults reproduce
both published settings at k = V = C. Summed over 64 cached ids with weight 1 per class
instead, an LLM's KD term starts ~13x its CE and leaves the main head behind SFT. The ImageNet
recipe also sets alpha to 0 from epoch 50 of 100 (`--early_stop_epoch`): a schedule, left to
the trainer.
"""

from __future__ import annotations

import math

import torch
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
    alpha_v: float = 100.0,
    gamma: float = 1.0,
    kd_until_epoch: float = 0.0,
    epoch: float = 0.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """`gamma * CE(main head) + (alpha_v / V) * BinaryKL-Norm(aux head vs teacher on I)`.

    `kd_until_epoch` > 0 sets alpha to 0 from that epoch on (DHKD's `--early_stop_epoch`: 50
    of 100 epochs on ImageNet); 0 (the default) keeps the KD term throughout.

    Mean over rows. `student` is the main head, `aux_student` the auxiliary head at the same
    rows. Defaults: tau=2 and gamma=1 (DHKD), alpha_v=100 (DHKD's alpha x classes: 1 x 100 on
    CIFAR-100, 0.1 x 1000 on ImageNet); the class sum runs over the k cached ids only.
    """
    labels = teacher.labels.unsqueeze(-1)  # (N, 1)
    ce = student.lse() - student.gather(labels).squeeze(-1)  # (N,)

    s1 = aux_student.gather(teacher.ids)  # (N, k)
    x = (s1 - teacher.logits.to(s1.dtype)) / temperature
    # 1/2 log(1/2 / sigma) + 1/2 log(1/2 / (1 - sigma)) = -log 2 - (log sigma + log(1 - sigma)) / 2
    per_class = -math.log(2.0) - 0.5 * (F.logsigmoid(x) + F.logsigmoid(-x))
    kd = temperature**2 * per_class.sum(-1)  # (N,) summed over classes, as DHKD
    alpha = alpha_v / teacher.vocab_size  # DHKD's alpha for a task with V classes
    if kd_until_epoch > 0 and epoch >= kd_until_epoch:
        alpha = 0.0

    if stats is not None:
        stats["dual-head/ce"] = ce.mean().detach()
        stats["dual-head/kd"] = kd.mean().detach()
        stats["dual-head/kd_on"] = torch.full((), float(alpha > 0), device=kd.device)
        stats["dual-head/teacher_tail_mass"] = teacher.log_tail.exp().mean().detach()
    return (gamma * ce + alpha * kd).mean()


SPECS: dict[str, LossSpec] = {
    "dual-head": LossSpec(
        dual_head,
        "Dual-head KD: gamma CE on the main head + (alpha_v/V) BinaryKL-Norm (tau=2, summed "
        "over classes) on an aux lm_head vs raw teacher logits, gamma=1 alpha_v=100 (DHKD's "
        "alpha x classes); approximate: restricted to the cached ids; --ce-weight would add a "
        "second CE",
        aux_head=True,
        ce_option="gamma",
    ),
}
