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
  fallback, a lower bound on the tail for T > 1) and `stats` flags it.

Neither loss includes the plain cross-entropy that both papers add (`CE + L`): the trainer's CE
weight provides it. DKD's warm-up (`min(epoch / warmup, 1)`) is a schedule, also the trainer's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def dkd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of `T^2 (alpha TCKD + beta NCKD)`.

    Defaults are the paper's ImageNet setting (T=1, alpha=1, beta=0.5), the published setting
    closest to an LLM vocabulary, and T=1 keeps the target part exact from the cache. (CIFAR-100
    used T=4, beta=8; at T=1 and beta=1, DKD is TCKD + NCKD >= KL.)
    """
    t, s = _teacher_split(teacher, temperature), _student_split(student, teacher, temperature)
    tckd = _kl(torch.stack([t.log_target, t.log_non_target], -1), torch.stack([s.log_target, s.log_non_target], -1))
    nckd = _kl(t.log_non_target_dist, s.log_non_target_dist)  # (N,)
    per_row = temperature**2 * (alpha * tckd + beta * nckd)
    if stats is not None:
        stats["dkd/tckd"] = tckd.mean().detach()
        stats["dkd/nckd"] = nckd.mean().detach()
        stats["dkd/nckd_tail_mass"] = t.log_non_target_dist[:, -1].exp().mean().detach()
        stats["dkd/teacher_approx"] = _approx_flag(teacher, temperature, per_row)
    return per_row.mean()


def nkd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of `-p_y log q_y - gamma T^2 sum_{i != y} p~_i log q~_i`.

    The target term is at T = 1 with `p_y` detached (yzd-v/cls_KD `NKDLoss`); the non-target
    term is a cross-entropy at T over the bucketed non-target distributions. Defaults are the
    official ImageNet ones (T=1, gamma=1.5). fpcsong/BiLD's LLM port uses gamma=0.25, no T^2.
    """
    t, s = _teacher_split(teacher, temperature), _student_split(student, teacher, temperature)
    if temperature == 1.0:
        log_p_y, log_q_y = t.log_target, s.log_target
    else:
        log_p_y = teacher.label_logprob
        log_q_y = student.gather(teacher.labels.unsqueeze(-1)).squeeze(-1) - student.lse()
    target = -log_p_y.exp() * log_q_y  # (N,)
    non_target = -_cross_entropy(t.log_non_target_dist, s.log_non_target_dist)  # (N,) <= 0
    per_row = target + gamma * temperature**2 * non_target
    if stats is not None:
        stats["nkd/target"] = target.mean().detach()
        stats["nkd/non_target"] = non_target.mean().detach()
        stats["nkd/tail_mass"] = t.log_non_target_dist[:, -1].exp().mean().detach()
        stats["nkd/teacher_approx"] = _approx_flag(teacher, temperature, per_row)
    return per_row.mean()


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
        return log_tail + _log1mexp(gap)

    lse_t = teacher.lse_at(temperature)
    if temperature == 1.0:
        log_rest = rest_without_label(teacher.log_tail, lp_y)
    elif lse_t is not None:
        # log softmax(z / T) with z = logprob + lse; the tail at T by complement (exact).
        lp = (lp + teacher.lse.unsqueeze(-1)) / temperature - lse_t.unsqueeze(-1)
        lp_y = (lp_y + teacher.lse) / temperature - lse_t
        if teacher.k >= teacher.vocab_size:
            log_tail = torch.full_like(lp_y, -torch.inf)
        else:
            log_tail = _log1mexp(torch.logsumexp(lp, dim=-1))
        log_rest = rest_without_label(log_tail, lp_y)
    else:
        # Fallback: the ids outside I + {y} act as one token of mass p_rest at T = 1.
        log_rest = rest_without_label(teacher.log_tail, lp_y) / temperature
        lp, lp_y = lp / temperature, lp_y / temperature
        outside_y = torch.where(label_inside, -torch.inf, lp_y)
        norm = torch.logsumexp(torch.cat([lp, outside_y.unsqueeze(-1), log_rest.unsqueeze(-1)], -1), -1)
        lp, lp_y, log_rest = lp - norm.unsqueeze(-1), lp_y - norm, log_rest - norm
    slots = torch.cat([torch.where(is_label, -torch.inf, lp), log_rest.unsqueeze(-1)], -1)  # (N, k+1)
    log_non_target = torch.logsumexp(slots, dim=-1)  # (N,) no cancellation: a sum of the parts
    return _Split(lp_y, log_non_target, slots - log_non_target.unsqueeze(-1))


def _student_split(student: StudentLogits, teacher: TeacherBatch, temperature: float) -> _Split:
    scaled = student.scaled(temperature)
    ids = torch.cat([teacher.ids, teacher.labels.unsqueeze(-1)], dim=-1)  # (N, k + 1)
    logq = scaled.gather(ids) - scaled.lse().unsqueeze(-1)  # (N, k + 1)
    logq_i, logq_y = logq[:, :-1], logq[:, -1]
    is_label = teacher.ids == teacher.labels.unsqueeze(-1)
    slots_i = torch.where(is_label, -torch.inf, logq_i)  # (N, k)
    if teacher.k >= teacher.vocab_size:
        log_rest = torch.full_like(logq_y, -torch.inf)
    else:
        covered = torch.logsumexp(torch.cat([slots_i, logq_y.unsqueeze(-1)], -1), dim=-1)
        log_rest = _log1mexp(covered)
    slots = torch.cat([slots_i, log_rest.unsqueeze(-1)], -1)
    log_non_target = torch.logsumexp(slots, dim=-1)
    return _Split(logq_y, log_non_target, slots - log_non_target.unsqueeze(-1))


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(N,) sum_i p_i (log p_i - log q_i) over the last dim, with 0 log 0 = 0."""
    support = log_p > -torch.inf
    lp = torch.where(support, log_p, 0.0)
    lq = torch.where(support, log_q, 0.0)
    return torch.where(support, lp.exp() * (lp - lq), 0.0).sum(-1)


def _cross_entropy(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(N,) sum_i p_i log q_i over the last dim (the negated cross-entropy), with 0 log 0 = 0."""
    support = log_p > -torch.inf
    lq = torch.where(support, log_q, 0.0)
    return torch.where(support, log_p.exp() * lq, 0.0).sum(-1)


def _approx_flag(teacher: TeacherBatch, temperature: float, like: Tensor) -> Tensor:
    exact = temperature == 1.0 or teacher.lse_at(temperature) is not None
    return torch.tensor(0.0 if exact else 1.0, device=like.device)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012).

    `x` is clamped just below 0: a mass that round-off puts at 1 becomes 1 - 8 eps, so the log
    stays finite and its gradient bounded.
    """
    x = x.clamp(max=-8 * torch.finfo(x.dtype).eps)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


SPECS: dict[str, LossSpec] = {
    "dkd": LossSpec(
        dkd,
        "Decoupled KD T^2(alpha TCKD + beta NCKD), T=1 alpha=1 beta=0.5, add CE separately; "
        "TCKD exact (stored label log-prob), NCKD bucketed over the cache (lower bound)",
    ),
    "nkd": LossSpec(
        nkd,
        "Normalized KD: -p_y log q_y - gamma T^2 CE(non-target), T=1 gamma=1.5, add CE "
        "separately; target exact, non-target bucketed over the cache",
    ),
}
