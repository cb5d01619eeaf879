"""DKD (Zhao et al. 2022) and NKD (Yang et al. 2023): target / non-target decoupled distillation.

Both split the teacher's distribution at temperature T into the label `y` and the rest:
`b = [p_y, 1 - p_y]` (binary, target vs non-target) and `p~ = softmax(z_{-y} / T)` (the
non-target distribution). Identity, at any T: `KL(p || q) = TCKD + (1 - p_y) * NCKD` with
`TCKD = KL(b^T || b^S)` and `NCKD = KL(p~^T || p~^S)`.

From the cache (`p_y` comes from the stored label log-prob, so it is exact even for `y` not in I):

* target terms are exact at T = 1, and at any T whose `lse(z / T)` the cache stored;
* the non-target distribution is bucketed: the ids of I other than `y`, plus one bucket for
  every id outside `I + {y}`. Bucketed NCKD is a lower bound on NCKD (data processing); the
  teacher's non-target mass in the bucket goes to `stats`;
* at a T the cache did not store, the teacher's bucket is treated as one token (DistillKit's
  fallback, a lower bound on the tail for T > 1); the fraction of rows it changes goes to
  `stats`.

Both papers train with the plain label cross-entropy beside their term (`CE + L`: mdistiller
`DKD.forward_train` with CE weight 1, cls_KD's distiller keeps the student's own loss next to
`loss_dkd` / `loss_nkd`), so both losses here add `ce * CE` at T = 1, `ce=1` by default; `ce=0`
gives the bare term. DKD's warm-up (`min(epoch / warmup, 1)` on the DKD term) is a schedule,
left to the trainer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._logspace import (
    approx_temperature_rows,
    kl_div,
    log1mexp,
    log_tail_from_head,
    soft_cross_entropy,
    teacher_logprobs,
)
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits
from student_trainer.losses.zloss import cross_entropy


def dkd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    ce: float = 1.0,
    warmup_epochs: float = 0.0,
    epoch: float = 0.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of `ce * CE + w T^2 (alpha TCKD + beta NCKD)`, CE on the labels at T = 1.

    `w = min(epoch / warmup_epochs, 1)`: the paper's linear warm-up of the KD term (20 epochs
    on CIFAR-100 and ImageNet, mdistiller's `warmup`); 0 (the default here) starts at full
    weight, as an LLM run of a fraction of an epoch would never warm up otherwise.

    Defaults are the paper's ImageNet setting (T=1, alpha=1, beta=0.5), the published setting
    closest to an LLM vocabulary, and T=1 keeps the target part exact from the cache. (CIFAR-100
    used T=4, beta=8; at T=1 and beta=1, DKD is TCKD + NCKD >= KL.) `ce=1` is the paper's CE
    weight; `ce=0` leaves the bare DKD term.
    """
    t, s = _teacher_split(teacher, temperature), _student_split(student, teacher, temperature)
    tckd = kl_div(
        torch.stack([t.log_target, t.log_non_target], -1),
        torch.stack([s.log_target, s.log_non_target], -1),
    )
    nckd = kl_div(t.log_non_target_dist, s.log_non_target_dist)  # (N,)
    warm = min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    loss = warm * (temperature**2 * (alpha * tckd + beta * nckd)).mean()
    label_ce = cross_entropy(student, teacher.labels) if ce else None
    if label_ce is not None:
        loss = loss + ce * label_ce
    if stats is not None:
        if label_ce is not None:
            stats["dkd/ce"] = label_ce.detach()
        stats["dkd/tckd"] = tckd.mean().detach()
        stats["dkd/nckd"] = nckd.mean().detach()
        stats["dkd/warmup"] = torch.full((), warm, device=tckd.device)
        stats["dkd/nckd_tail_mass"] = t.log_non_target_dist[:, -1].exp().mean().detach()
        stats["dkd/teacher_approx_rows"] = approx_temperature_rows(teacher, temperature)
    return loss


def nkd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    ce: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of `ce * CE - p_y log q_y - gamma T^2 sum_{i != y} p~_i log q~_i`.

    The target term is at T = 1 with `p_y` detached (yzd-v/cls_KD `NKDLoss`); the non-target
    term is a cross-entropy at T over the bucketed non-target distributions. Defaults are the
    official ImageNet ones (T=1, gamma=1.5, and the student's own CE beside the NKD term);
    `ce=0` leaves the bare NKD term. fpcsong/BiLD's LLM port uses gamma=0.25, no T^2.
    """
    t, s = _teacher_split(teacher, temperature), _student_split(student, teacher, temperature)
    if temperature == 1.0:
        log_p_y, log_q_y = t.log_target, s.log_target
    else:
        log_p_y = teacher.label_logprob
        log_q_y = student.gather(teacher.labels.unsqueeze(-1)).squeeze(-1) - student.lse()
    target = -log_p_y.exp() * log_q_y  # (N,)
    non_target = soft_cross_entropy(t.log_non_target_dist, s.log_non_target_dist)  # (N,) >= 0
    loss = (target + gamma * temperature**2 * non_target).mean()
    label_ce = cross_entropy(student, teacher.labels) if ce else None
    if label_ce is not None:
        loss = loss + ce * label_ce
    if stats is not None:
        if label_ce is not None:
            stats["nkd/ce"] = label_ce.detach()
        stats["nkd/target"] = target.mean().detach()
        stats["nkd/non_target"] = non_target.mean().detach()
        stats["nkd/tail_mass"] = t.log_non_target_dist[:, -1].exp().mean().detach()
        stats["nkd/teacher_approx_rows"] = approx_temperature_rows(teacher, temperature)
    return loss


class _Split(NamedTuple):
    log_target: Tensor
    """(N,) log p_y at T."""
    log_non_target: Tensor
    """(N,) log(1 - p_y) at T."""
    log_non_target_dist: Tensor
    """(N, k + 1) log p~ over [the ids of I (-inf at y), the bucket outside I + {y}]."""


def _teacher_split(teacher: TeacherBatch, temperature: float) -> _Split:
    is_label = teacher.ids == teacher.labels.unsqueeze(-1)  # (N, k)
    label_inside = is_label.any(-1)  # (N,)
    lp, lp_y = teacher.logprobs, teacher.label_logprob

    def rest_without_label(log_tail: Tensor, log_y: Tensor) -> Tensor:
        # Remove the label's mass from the tail when the label lies outside I.
        gap = torch.where(label_inside, -torch.inf, log_y - log_tail)
        return log_tail + log1mexp(gap.clamp(max=0.0))

    lse_t = teacher.lse_at(temperature)
    if temperature == 1.0:
        log_rest = rest_without_label(teacher.log_tail, lp_y)
    elif lse_t is not None:
        # log softmax(z / T) with z = logprob + lse; the tail at T by complement (exact).
        lp = teacher_logprobs(teacher, temperature)
        lp_y = lp_y / temperature + (teacher.lse / temperature - lse_t)
        log_tail = log_tail_from_head(lp, covers_vocab=teacher.k >= teacher.vocab_size)
        log_rest = rest_without_label(log_tail, lp_y)
    else:
        # Fallback: the ids outside I + {y} act as one token of mass p_rest at T = 1.
        log_rest = rest_without_label(teacher.log_tail, lp_y) / temperature
        lp, lp_y = lp / temperature, lp_y / temperature
        outside_y = torch.where(label_inside, -torch.inf, lp_y)
        norm = torch.logsumexp(
            torch.cat([lp, outside_y.unsqueeze(-1), log_rest.unsqueeze(-1)], -1), -1
        )
        lp, lp_y, log_rest = lp - norm.unsqueeze(-1), lp_y - norm, log_rest - norm
    slots = torch.cat(
        [torch.where(is_label, -torch.inf, lp), log_rest.unsqueeze(-1)], -1
    )  # (N, k+1)
    log_non_target = torch.logsumexp(slots, dim=-1)  # (N,) no cancellation: a sum of the parts
    return _Split(lp_y, log_non_target, slots - log_non_target.unsqueeze(-1))


def _student_split(student: StudentLogits, teacher: TeacherBatch, temperature: float) -> _Split:
    scaled = student.scaled(temperature)
    ids = torch.cat([teacher.ids, teacher.labels.unsqueeze(-1)], dim=-1)  # (N, k + 1)
    logq = scaled.gather(ids) - scaled.lse().unsqueeze(-1)  # (N, k + 1)
    logq_i, logq_y = logq[:, :-1], logq[:, -1]
    is_label = teacher.ids == teacher.labels.unsqueeze(-1)
    slots_i = torch.where(is_label, -torch.inf, logq_i)  # (N, k)
    covered = torch.cat([slots_i, logq_y.unsqueeze(-1)], -1)  # (N, k + 1) log q on I + {y}
    log_rest = log_tail_from_head(covered, covers_vocab=teacher.k >= teacher.vocab_size)
    slots = torch.cat([slots_i, log_rest.unsqueeze(-1)], -1)
    log_non_target = torch.logsumexp(slots, dim=-1)
    return _Split(logq_y, log_non_target, slots - log_non_target.unsqueeze(-1))


SPECS: dict[str, LossSpec] = {
    "dkd": LossSpec(
        dkd,
        "Decoupled KD: ce CE + T^2(alpha TCKD + beta NCKD), T=1 alpha=1 beta=0.5 ce=1 (the "
        "paper's CE; ce=0 drops it, and --ce-weight would add a second one); TCKD exact "
        "(stored label log-prob), NCKD bucketed over the cache (lower bound)",
        ce_option="ce",
        tail_at_temperature=True,
    ),
    "nkd": LossSpec(
        nkd,
        "Normalized KD: ce CE - p_y log q_y - gamma T^2 CE(non-target), T=1 gamma=1.5 ce=1 (the "
        "paper's CE; ce=0 drops it, and --ce-weight would add a second one); target exact, "
        "non-target bucketed over the cache",
        ce_option="ce",
        tail_at_temperature=True,
    ),
}
