"""Log-space building blocks shared by the losses: tails, (k+1)-point buckets, safe divergences.

Every helper works on log-probabilities, keeps the input dtype (float32 in training, float64 in
gradchecks) and follows one convention: a term whose weight is a zero probability (log-prob
-inf) contributes exactly 0 to the value and to the gradient, never NaN.

A bucket is the (k+1)-point distribution (p_I, p_tail) of the cached top-k ids I plus one bucket
for the rest of the vocabulary, stored as log-probabilities of shape (N, k+1), tail last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._student import StudentLogits

_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012).

    Near 0 it uses log(-expm1(x)), far from 0 log1p(-exp(x)). log1mexp(-inf) = 0 and
    log1mexp(0) = -inf. Each branch sees an input clamped to its own side of -log 2, so the
    branch `torch.where` discards never sends a NaN into the gradient.
    """
    near = x.clamp(min=_LOG_HALF)  # branch for -log 2 < x <= 0
    far = x.clamp(max=_LOG_HALF)  # branch for x <= -log 2, including -inf
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


def log_tail_from_head(log_head: Tensor, *, covers_vocab: bool) -> Tensor:
    """(N,) log(1 - sum(exp(log_head))): the log-mass outside the ids behind `log_head` (N, k).

    With `covers_vocab` (k = V, a static fact) the tail is exactly empty: -inf, no gradient.
    Otherwise the head mass is clamped to 1 - eps of the dtype, so a tail smaller than the dtype
    can resolve (rounding in the log-sum-exp) reads as eps instead of -inf or NaN.
    """
    if covers_vocab:
        return torch.full(
            log_head.shape[:-1], -torch.inf, dtype=log_head.dtype, device=log_head.device
        )
    head = torch.logsumexp(log_head, dim=-1)  # (N,)
    floor = math.log1p(-torch.finfo(log_head.dtype).eps)
    return log1mexp(head.clamp(max=floor))


def teacher_logprobs(teacher: TeacherBatch, temperature: float = 1.0) -> Tensor:
    """(N, k) teacher log-probs at `teacher.ids` at `temperature`, when the cache makes them exact.

    Exact at T = 1 and at every T whose lse(z / T) was stored; raises otherwise (use
    `teacher_bucket`, which falls back to the one-token tail approximation).
    """
    if temperature == 1.0:
        return teacher.logprobs
    lse_t = teacher.lse_at(temperature)
    if lse_t is None:
        raise ValueError(f"lse(z / {temperature}) is not stored in this cache")
    # z / T - lse_T = lp / T + (lse / T - lse_T): the per-row offset keeps lp's precision.
    offset = teacher.lse / temperature - lse_t  # (N,)
    return teacher.logprobs / temperature + offset.unsqueeze(-1)


def teacher_bucket(teacher: TeacherBatch, temperature: float = 1.0) -> Tensor:
    """(N, k+1) teacher log-probs (lp_I, log p_tail) at `temperature`.

    T = 1: the cached log-probs and the stored fp32 tail (no 1 - sum(p) cancellation).
    T with lse(z / T) stored: exact; the tail is 1 minus the tempered top-k mass.
    Other T: approximate. The tail is treated as one token, (lp_I / T, log_tail / T) renormalised
    (DistillKit's choice): the tempered tail mass it gives is a lower bound for T > 1.
    `approx_temperature_rows` gives the fraction of rows this changes.
    """
    if temperature == 1.0:
        return torch.cat([teacher.logprobs, teacher.log_tail.unsqueeze(-1)], dim=-1)
    if teacher.lse_at(temperature) is not None:
        lp = teacher_logprobs(teacher, temperature)  # (N, k)
        tail = log_tail_from_head(lp, covers_vocab=teacher.k == teacher.vocab_size)  # (N,)
        return torch.cat([lp, tail.unsqueeze(-1)], dim=-1)
    scaled = torch.cat([teacher.logprobs, teacher.log_tail.unsqueeze(-1)], dim=-1) / temperature
    return torch.log_softmax(scaled, dim=-1)


def approx_temperature_rows(teacher: TeacherBatch, temperature: float) -> Tensor:
    """() fraction of rows whose `teacher_bucket` at `temperature` is approximate (detached).

    0 when the temperature is exact from the cache; otherwise the rows with a non-empty tail
    (with an empty tail, renormalising the top-k at T is exact).
    """
    if teacher.lse_at(temperature) is not None:
        return torch.zeros((), device=teacher.lse.device)
    return (teacher.log_tail > -torch.inf).float().mean().detach()


def student_bucket(student: StudentLogits, ids: Tensor) -> Tensor:
    """(N, k+1) student log-probs (log q_I, log q_tail) at `ids` (N, k), from lse and a gather.

    Needs only `student.lse()` and `student.gather(ids)`: no [N, V] logits.
    """
    log_q = student.logprobs_at(ids)  # (N, k)
    tail = log_tail_from_head(log_q, covers_vocab=ids.shape[-1] == student.vocab_size)  # (N,)
    return torch.cat([log_q, tail.unsqueeze(-1)], dim=-1)


def _weighted(log_w: Tensor, values: Tensor) -> Tensor:
    """exp(log_w) * values, with 0 wherever exp(log_w) = 0, whatever `values` holds there.

    The double `where` keeps a -inf or NaN in `values` out of both the value and the gradient.
    """
    live = log_w > -torch.inf
    w = torch.exp(log_w)
    return torch.where(live, w * torch.where(live, values, torch.zeros_like(values)), 0.0)


def kl_div(log_p: Tensor, log_q: Tensor, dim: int = -1) -> Tensor:
    """KL(p || q) = sum p (log p - log q) along `dim`; terms with p = 0 give 0 (and 0 gradient)."""
    return _weighted(log_p, log_p - log_q).sum(dim)


def soft_cross_entropy(log_p: Tensor, log_q: Tensor, dim: int = -1) -> Tensor:
    """-sum p log q along `dim`; terms with p = 0 give 0 (and 0 gradient)."""
    return -_weighted(log_p, log_q).sum(dim)


def entropy(log_p: Tensor, dim: int = -1) -> Tensor:
    """-sum p log p along `dim`; terms with p = 0 give 0 (and 0 gradient)."""
    return soft_cross_entropy(log_p, log_p, dim)


def log_mix(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(weight * p + (1 - weight) * q), elementwise, for a Python `weight` in [0, 1].

    Where p = q = 0 the result is -inf with a zero gradient (a plain logaddexp gives NaN there).
    """
    if weight == 1.0:
        return log_p
    if weight == 0.0:
        return log_q
    both_empty = (log_p == -torch.inf) & (log_q == -torch.inf)
    a = torch.where(both_empty, torch.zeros_like(log_p), log_p) + math.log(weight)
    b = torch.where(both_empty, torch.zeros_like(log_q), log_q) + math.log1p(-weight)
    return torch.where(both_empty, -torch.inf, torch.logaddexp(a, b))
