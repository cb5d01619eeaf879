"""Random-sampling KD (RS-KD, arXiv 2503.16870): forward KL from ids sampled from the teacher.

The builder draws n ids per position from a proposal r (the teacher at `sample_temperature` t)
and stores the unique ids u, their counts c_u and the teacher log-probs lp_u. The target is the
importance-weighted empirical distribution p~_u ∝ c_u p^T_u / r_u, and the loss is the
cross-entropy -sum_u p~_u log q^T_u with the student's full-vocabulary lse. When T = t the
weights are c_u / n and the gradient q - p~ is an unbiased estimate of the full-KL gradient
q - p; otherwise the weights are self-normalised (consistent, biased for small n).
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
    log_p_tilde = torch.log_softmax(log_w, dim=-1)  # (N, n)
    log_q = student.scaled(temperature).logprobs_at(teacher.sample_ids)  # (N, n)
    if stats is not None:
        stats["rskd/unique_ids"] = (teacher.sample_counts > 0).sum(-1).float().mean().detach()
        # a fill, not a host-to-device copy: no sync point
        stats["rskd/self_normalized"] = torch.full((), float(shift != 0.0), device=log_w.device)
    return temperature**2 * soft_cross_entropy(log_p_tilde, log_q).mean()


SPECS: dict[str, LossSpec] = {
    "rskd": LossSpec(
        rskd,
        "random-sampling KD (RS-KD): cross-entropy to importance-weighted teacher samples, x T^2; "
        "unbiased FKL gradient when T equals the sampling temperature, else self-normalised",
        needs_samples=True,
    ),
}
