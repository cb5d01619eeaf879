"""Random-sampling KD (RS-KD, arXiv 2503.16870): forward KL from ids sampled from the teacher.

The builder draws n ids per position from a proposal r (the teacher at `sample_temperature` t)
and stores the unique ids u, their counts c_u and the teacher log-probs lp_u. The target is the
importance-weighted empirical distribution p~_u ∝ c_u p^T_u / r_u, and the loss is the
cross-entropy -sum_u p~_u log q^T_u with the student's full-vocabulary lse. When T = t the
weights are c_u / n and the gradient q - p~ is an unbiased estimate of the full-KL gradient
q - p; otherwise the weights are self-normalised (consistent, biased for small n).

A cache with compact samples and a top-k lists only the draws outside the top-k and says how
many fell inside it (n minus the listed counts). Those draws are replaced by their expectation
given that count: (n - m) r_i / r_I on each top-k id i (r at the sample temperature, from the
exact top-k log-probs). The target's expectation is unchanged (still unbiased at T = t) and its
variance on the head is gone (Rao-Blackwellisation); this is what rskd reads from any cache with
both a top-k and samples built from format 3.0 on. `--top-k 0 --samples N` caches keep the
paper's estimator exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._logspace import soft_cross_entropy
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def rskd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """T^2 * -sum_u p~_u log q_u over the sampled ids u, mean over rows.

    p~_u ∝ c_u exp((1/T - 1/t) z_u), self-normalised per row: p^T_u / r_u up to a per-row
    constant, and the raw logit z_u may be replaced by lp_u because the teacher lse cancels.
    Padding (count 0) gets weight 0. `stats["rskd/unique_ids"]` is the mean number of distinct
    sampled ids per row; `stats["rskd/self_normalized"]` is 1 when T != t (biased estimate).
    """
    if (
        teacher.sample_ids is None
        or teacher.sample_counts is None
        or teacher.sample_logprobs is None
    ):
        raise ValueError(
            "rskd needs teacher samples, and this cache has none: rebuild it with "
            "`kdcache build --samples N` (e.g. --samples 50), or pick a top-k loss"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shift = 1.0 / temperature - 1.0 / teacher.sample_temperature
    log_w = teacher.sample_counts.log() + shift * teacher.sample_logprobs  # (N, n); -inf = padding
    ids = teacher.sample_ids
    if teacher.num_draws and teacher.k:  # compact: the draws inside the top-k are not listed
        log_w, ids = _with_head_draws(teacher, log_w, shift)
    log_p_tilde = torch.log_softmax(log_w, dim=-1)  # (N, n [+ k])
    log_q = student.scaled(temperature).logprobs_at(ids)  # (N, n [+ k])
    if stats is not None:
        stats["rskd/unique_ids"] = (teacher.sample_counts > 0).sum(-1).float().mean().detach()
        # a fill, not a host-to-device copy: no sync point
        stats["rskd/self_normalized"] = torch.full((), float(shift != 0.0), device=log_w.device)
    return temperature**2 * soft_cross_entropy(log_p_tilde, log_q).mean()


def _with_head_draws(teacher: TeacherBatch, log_w: Tensor, shift: float) -> tuple[Tensor, Tensor]:
    """Sample weights and ids with the top-k appended: the unlisted draws that fell inside it,
    spread as their conditional expectation (n - m) r_i / r_I, times the importance weight."""
    assert teacher.sample_counts is not None and teacher.sample_ids is not None
    inside = (teacher.draws() - teacher.sample_counts.sum(-1)).clamp_min(0.0)  # (N,) n - m
    log_r = teacher.logprobs / teacher.sample_temperature  # (N, k) proposal, up to a constant
    log_head = inside.log().unsqueeze(-1) + torch.log_softmax(log_r, dim=-1)  # (N, k)
    log_head = log_head + shift * teacher.logprobs
    return torch.cat([log_w, log_head], -1), torch.cat([teacher.sample_ids, teacher.ids], -1)


SPECS: dict[str, LossSpec] = {
    "rskd": LossSpec(
        rskd,
        "random-sampling KD (RS-KD): cross-entropy to importance-weighted teacher samples, x T^2; "
        "unbiased FKL gradient when T equals the sampling temperature, else self-normalised; "
        "with a top-k in the cache, the draws inside it count at their expectation (same mean, "
        "less variance)",
        needs_samples=True,
        reads_topk=False,
    ),
}
