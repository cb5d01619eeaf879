"""PLD: Plackett-Luce distillation (Bassam et al., arXiv 2506.12542), truncated to the cached prefix.

The teacher-optimal ranking is `pi = (y, the other classes by descending teacher logit)`, and

    L = sum_j alpha_j [log sum_{l >= j} exp(s_{pi_l}) - s_{pi_j}],  alpha = softmax(z / tau)[pi].

From the cache the prefix `(y, I \\ {y})` is known in order; the steps after it (the tail, in an
unknown order) are dropped. Every prefix step is exact: its denominator is the student mass on
the prefix ids from that step on plus all the mass outside the prefix, which is
`exp(lse) - sum_prefix exp(s)`. The weight on the dropped steps, `1 - sum_prefix alpha`, goes to
`stats`. `alpha_y` comes from the stored label log-prob, so it is exact even when `y` is not in I.

`alpha` at `tau != 1` needs `lse(z / tau)`: exact when the cache stored that temperature,
otherwise the tail outside `I + {y}` is treated as one token (a DistillKit-style fallback, flagged
in `stats`). PLD replaces cross-entropy (no extra CE term); tau = 1 was best on ImageNet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def pld(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of the truncated PLD loss; `temperature` is the paper's tau for alpha."""
    n, k, vocab = teacher.ids.shape[0], teacher.k, teacher.vocab_size
    prefix = torch.cat([teacher.labels.unsqueeze(-1), teacher.ids], dim=-1)  # (N, k + 1)
    # The label also sits inside I when the teacher ranks it in its top-k: drop that copy.
    dup = torch.cat([prefix.new_zeros(n, 1, dtype=torch.bool), teacher.ids == teacher.labels.unsqueeze(-1)], dim=-1)

    s = student.gather(prefix)  # (N, k + 1)
    lse = student.lse()  # (N,)
    very_negative = torch.finfo(s.dtype).min / 4
    s_kept = torch.where(dup, very_negative, s)
    if k >= vocab:
        # The prefix is the whole vocabulary: nothing lies outside it.
        rest = torch.full_like(lse, -torch.inf)
    else:
        rest = lse + _log1mexp(torch.logsumexp(s_kept, dim=-1) - lse)  # (N,) log mass outside
    # suffix[j] = log sum_{l >= j} exp(s_kept[l]) over the prefix.
    suffix = torch.logcumsumexp(s_kept.flip(-1), dim=-1).flip(-1)  # (N, k + 1)
    steps = torch.logaddexp(suffix, rest.unsqueeze(-1)) - s  # (N, k + 1) per-step NLL

    log_alpha = _teacher_log_alpha(teacher, temperature, dup)  # (N, k + 1), -inf on the copy
    alpha = log_alpha.exp()
    per_row = torch.where(dup, torch.zeros_like(steps), alpha * steps).sum(-1)  # (N,)

    if stats is not None:
        stats["pld/dropped_weight"] = (1.0 - alpha.sum(-1)).clamp(min=0.0).mean().detach()
        stats["pld/label_outside_cache"] = (~dup.any(-1)).float().mean().detach()
        exact_alpha = temperature == 1.0 or teacher.lse_at(temperature) is not None
        stats["pld/alpha_approx"] = torch.tensor(0.0 if exact_alpha else 1.0, device=s.device)
    return per_row.mean()


def _teacher_log_alpha(teacher: TeacherBatch, temperature: float, dup: Tensor) -> Tensor:
    """(N, k + 1) log softmax(z / tau) at `(y, I)`; -inf where `dup` marks the repeated label."""
    values = torch.cat([teacher.label_logprob.unsqueeze(-1), teacher.logprobs], dim=-1)  # (N, k+1)
    values = torch.where(dup, -torch.inf, values)
    if temperature == 1.0:
        return values
    lse_t = teacher.lse_at(temperature)
    if lse_t is not None:
        # z / tau - lse(z / tau), with z = logprob + lse.
        return (values + teacher.lse.unsqueeze(-1)) / temperature - lse_t.unsqueeze(-1)
    # Fallback: everything outside I + {y} as one token of mass p_rest.
    label_outside = ~dup.any(-1)
    gap = torch.where(label_outside, teacher.label_logprob - teacher.log_tail, -torch.inf)
    log_rest = teacher.log_tail + _log1mexp(gap)  # (N,)
    scaled = torch.cat([values, log_rest.unsqueeze(-1)], dim=-1) / temperature
    return values / temperature - torch.logsumexp(scaled, dim=-1, keepdim=True)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012).

    `x` is clamped just below 0: a mass that round-off puts at 1 becomes 1 - 8 eps, so the log
    stays finite and its gradient bounded.
    """
    x = x.clamp(max=-8 * torch.finfo(x.dtype).eps)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


SPECS: dict[str, LossSpec] = {
    "pld": LossSpec(
        pld,
        "Plackett-Luce distillation over (label, teacher top-k) in teacher order, tau=1, no CE; "
        "approximate: ranking steps after the cached prefix are dropped",
    ),
}
