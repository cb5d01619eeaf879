"""Exact head, sampled tail: a forward KL that is exact on the cached top-k and unbiased on the
rest (the "hybrid FKL" of losses.md; ours).

Notation, per position: I the cached top-k with exact log-probs lp_i; p_tail = 1 - sum_I p_i
(stored exactly as `log_tail`); n draws from the teacher at T = 1 with their log-probs lp_u;
the m of them outside I are draws from p(. | tail). With

    T  = sum_{x not in I} p_x (lp_x - log q_x)           the tail part of KL(p || q),
    S  = p_tail * (1/m) sum_{u not in I} (lp_u - log q_u)  its estimate from the tail draws,
    B  = p_tail (log p_tail - log q_tail)                  fkl-tail's bucket (a lower bound),
    P1 = P(m >= 1) = 1 - (1 - p_tail)^n                   exact, from the cache,

the loss is   L = sum_{i in I} p_i (lp_i - log q_i) + B + [m >= 1] (S - B) / P1.

Unbiased. Given m >= 1 each tail draw has law p_x / p_tail on the tail, so E[S | m >= 1] = T,
and E[[m >= 1](S - B)] = P1 (T - B): E[L] = head + B + (T - B) = KL(p || q). The gradient in
the student's logits is linear in the same weights, so E[grad L] = q - p, the full FKL
gradient: no truncation bias. A row with no tail draw gets B, fkl-tail's tail term, exactly;
B is the control variate of S (the two agree where the student's tail has the teacher's shape).
When the tail draws are many (P1 near 1), L is the plain estimate head + S.

Variance. None on the head; on the tail about p_tail^2 Var_{p|tail}(log q) / m, with a 1/P1
inflation only where a tail draw is rare. RS-KD (`rskd`) spends its draws on the whole
distribution and pays sampling variance on the head, where this loss is exact.

Needs a cache with samples drawn at T = 1 (`kdcache build --samples N`) and trains at T = 1:
draws at another sample temperature would need importance weights on the tail, and a tail at
another training temperature its own stored lse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._logspace import student_bucket
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def fkl_hybrid(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """KL(p || q) with the top-k exact and the tail estimated, without bias, from the draws
    outside it (the bucket where none fell there; see the module docstring).

    `stats["fkl-hybrid/tail_draws"]`: mean number of draws outside the top-k per row;
    `stats["fkl-hybrid/bucket_rows"]`: fraction of rows with tail mass but no such draw, whose
    tail falls back to fkl-tail's bucket.
    """
    if (
        teacher.sample_ids is None
        or teacher.sample_counts is None
        or teacher.sample_logprobs is None
    ):
        raise ValueError(
            "fkl-hybrid needs teacher samples, and this cache has none: rebuild it with "
            "`kdcache build --samples N` (e.g. --samples 16), or use fkl-tail"
        )
    if teacher.sample_temperature != 1.0:
        raise ValueError(
            f"fkl-hybrid needs draws from the teacher itself (sample temperature 1), and this "
            f"cache drew at {teacher.sample_temperature:g}: rebuild with --sample-temperature 1, "
            "or use rskd, which reweights its draws"
        )
    log_q = student_bucket(student, teacher.ids)  # (N, k+1): log q_I, log q_tail
    p_head = teacher.logprobs.exp()  # (N, k)
    head = (p_head * (teacher.logprobs - log_q[:, :-1])).sum(-1)  # exact on I

    outside = ~(teacher.sample_ids.unsqueeze(-1) == teacher.ids.unsqueeze(1)).any(-1)  # (N, n)
    weight = teacher.sample_counts * outside  # draws of each unique id outside I (0: padding)
    drawn = weight.sum(-1)  # (N,) m
    log_q_u = student.logprobs_at(teacher.sample_ids)  # (N, n)
    per_draw = torch.where(weight > 0, teacher.sample_logprobs - log_q_u, 0.0)
    sampled = (weight * per_draw).sum(-1) / drawn.clamp_min(1.0)  # (N,) mean over tail draws

    p_tail = teacher.log_tail.exp()  # (N,); 0 where the top-k holds all the mass
    has_tail = p_tail > 0
    bucket = torch.where(has_tail, p_tail * (teacher.log_tail - log_q[:, -1]), 0.0)  # B
    # P(m >= 1) = 1 - (1 - p_tail)^n from the stored tail mass, exact: a head mass summed from
    # the encoded head log-probs can round to 1 (q8c) and blow 1/P1 up where the tail is tiny
    draws = teacher.draws()  # n, listed or not
    p_some = -torch.expm1(draws * torch.log1p(-p_tail.clamp(max=1.0)))
    hit = drawn > 0  # implies p_some > 0
    correction = torch.where(hit, (p_tail * sampled - bucket) / p_some.clamp_min(1e-30), 0.0)
    loss = head + bucket + correction
    if stats is not None:
        stats["fkl-hybrid/tail_draws"] = drawn.mean().detach()
        stats["fkl-hybrid/bucket_rows"] = ((drawn == 0) & has_tail).float().mean().detach()
    return loss.mean()


SPECS: dict[str, LossSpec] = {
    "fkl-hybrid": LossSpec(
        fkl_hybrid,
        "forward KL exact on the top-k and unbiased on the tail from the cached draws outside "
        "it (falls back to fkl-tail's bucket where none fell there); needs --samples at T = 1",
        needs_samples=True,
        sample_temperature=1.0,
        reads_topk=False,
    ),
}
