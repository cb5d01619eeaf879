"""PLD: Plackett-Luce distillation (Bassam et al., arXiv 2506.12542), truncated to the cached prefix.

The teacher-optimal ranking is `pi = (y, the other classes by descending teacher logit)`, and

    L = sum_j alpha_j [log sum_{l >= j} exp(s_{pi_l}) - s_{pi_j}],  alpha = softmax(z / tau)[pi].

From the cache the prefix `(y, I \\ {y})` is known in order; the steps after it (the tail, in an
unknown order) are dropped. Every prefix step is exact: its denominator is the student mass on
the prefix ids from that step on plus all the mass outside the prefix, which is
`exp(lse) - sum_prefix exp(s)`. The weight on the dropped steps, `1 - sum_prefix alpha`, goes to
`stats`. `alpha_y` comes from the stored label log-prob, so it is exact even when `y` is not in I.

`alpha` at `tau != 1` needs `lse(z / tau)`: exact when the cache stored that temperature,
otherwise the tail outside `I + {y}` is treated as one token (a DistillKit-style fallback; the
fraction of rows it changes goes to `stats`). PLD replaces cross-entropy (no extra CE term); tau = 1 was best on ImageNet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._logspace import approx_temperature_rows, log1mexp, log_tail_from_head
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
    dup = torch.cat(
        [prefix.new_zeros(n, 1, dtype=torch.bool), teacher.ids == teacher.labels.unsqueeze(-1)],
        dim=-1,
    )

    s = student.gather(prefix)  # (N, k + 1)
    lse = student.lse()  # (N,)
    very_negative = torch.finfo(s.dtype).min / 4
    s_kept = torch.where(dup, very_negative, s)
    # (N,) log student mass outside the prefix: exactly empty when the prefix is the vocabulary.
    rest = lse + log_tail_from_head(s_kept - lse.unsqueeze(-1), covers_vocab=k >= vocab)
    # suffix[j] = log sum_{l >= j} exp(s_kept[l]) over the prefix.
    suffix = torch.logcumsumexp(s_kept.flip(-1), dim=-1).flip(-1)  # (N, k + 1)
    steps = torch.logaddexp(suffix, rest.unsqueeze(-1)) - s  # (N, k + 1) per-step NLL

    log_alpha = _teacher_log_alpha(teacher, temperature, dup)  # (N, k + 1), -inf on the copy
    alpha = log_alpha.exp()
    per_row = torch.where(dup, torch.zeros_like(steps), alpha * steps).sum(-1)  # (N,)

    if stats is not None:
        stats["pld/dropped_weight"] = (1.0 - alpha.sum(-1)).clamp(min=0.0).mean().detach()
        stats["pld/label_outside_cache"] = (~dup.any(-1)).float().mean().detach()
        stats["pld/alpha_approx_rows"] = approx_temperature_rows(teacher, temperature)
    return per_row.mean()


def _teacher_log_alpha(teacher: TeacherBatch, temperature: float, dup: Tensor) -> Tensor:
    """(N, k + 1) log softmax(z / tau) at `(y, I)`; -inf where `dup` marks the repeated label."""
    values = torch.cat([teacher.label_logprob.unsqueeze(-1), teacher.logprobs], dim=-1)  # (N, k+1)
    values = torch.where(dup, -torch.inf, values)
    if temperature == 1.0:
        return values
    lse_t = teacher.lse_at(temperature)
    if lse_t is not None:
        # Exact: z / tau - lse(z / tau) = lp / tau + (lse / tau - lse(z / tau)).
        return values / temperature + (teacher.lse / temperature - lse_t).unsqueeze(-1)
    # Fallback: everything outside I + {y} as one token of mass p_rest.
    label_outside = ~dup.any(-1)
    gap = torch.where(label_outside, teacher.label_logprob - teacher.log_tail, -torch.inf)
    log_rest = teacher.log_tail + log1mexp(gap.clamp(max=0.0))  # (N,)
    scaled = torch.cat([values, log_rest.unsqueeze(-1)], dim=-1) / temperature
    return values / temperature - torch.logsumexp(scaled, dim=-1, keepdim=True)


SPECS: dict[str, LossSpec] = {
    "pld": LossSpec(
        pld,
        "Plackett-Luce distillation over (label, teacher top-k) in teacher order, tau=1, no CE; "
        "approximate: ranking steps after the cached prefix are dropped",
        tail_at_temperature=True,
    ),
}
