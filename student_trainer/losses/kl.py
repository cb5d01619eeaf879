"""f-divergences between the cached teacher and the student: FKL, RKL, JSD, TVD, skew KLs.

All but `fkl` use the bucketed form D^(k+1): the divergence between the (k+1)-point
distributions (p_I, p_tail) and (q_I, q_tail). It is exact from the cache at T = 1 (and at any T
whose lse(z / T) the builder stored), and by data processing it is a lower bound on the full
divergence, with equality when the student's tail is proportional to the teacher's. At any
other T the teacher's tail is tempered as one token (`teacher_bucket`), and the fraction of rows
that changes goes to `stats["<name>/approx_temperature"]`.

Every loss here needs only `student.lse()` and `student.gather(ids)`, so a `ChunkedStudent`
computes it without the [N, V] logits. Each returns the mean over rows of the per-token value.
"""

from __future__ import annotations

from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._logspace import (
    approx_temperature_rows,
    kl_div,
    log_mix,
    student_bucket,
    teacher_bucket,
)
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}: pass --loss-option {name}=0.5")


def _buckets(
    student: StudentLogits,
    teacher: TeacherBatch,
    temperature: float,
    stats: dict[str, Tensor] | None,
    name: str,
) -> tuple[Tensor, Tensor]:
    """(N, k+1) teacher and student bucket log-probs at `temperature`, logging the T fallback."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if stats is not None:
        stats[f"{name}/approx_temperature"] = approx_temperature_rows(teacher, temperature)
    log_p = teacher_bucket(teacher, temperature)  # (N, k+1)
    log_q = student_bucket(student.scaled(temperature), teacher.ids)  # (N, k+1)
    return log_p, log_q


def fkl(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """T^2 * sum_I p^_i (log p^_i - log q_i): the teacher renormalised over its top-k.

    p^ = softmax(lp_I / T) is exact from the cache at every T (the normaliser cancels); log q_i
    uses the student's full-vocabulary lse (DistillKit ZERO, axolotl forward_kl). It is its own
    objective, not the full KL: the teacher tail is dropped, so its gradient q_x on every tail
    id pushes the student's tail mass to 0. `stats["fkl/teacher_tail_mass"]` is the mean
    teacher tail mass (T = 1) the loss ignores.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = teacher.logprobs / temperature  # (N, k): z_I / T up to a per-row constant
    log_p_hat = scaled - scaled.logsumexp(dim=-1, keepdim=True)  # (N, k)
    log_q = student.scaled(temperature).logprobs_at(teacher.ids)  # (N, k)
    if stats is not None:
        stats["fkl/teacher_tail_mass"] = teacher.log_tail.exp().mean().detach()
    return temperature**2 * kl_div(log_p_hat, log_q).mean()


def fkl_tail(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """T^2 * KL(P || Q) over (top-k, tail): forward KL with the teacher tail as one bucket.

    Gradient at T = 1: q_i - p_i on I and q_x (1 - p_tail / q_tail) on each tail id x.
    """
    log_p, log_q = _buckets(student, teacher, temperature, stats, "fkl-tail")
    return temperature**2 * kl_div(log_p, log_q).mean()


def rkl(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """KL(Q || P) over (top-k, tail): reverse KL, a lower bound on the full reverse KL."""
    log_p, log_q = _buckets(student, teacher, temperature, stats, "rkl")
    return kl_div(log_q, log_p).mean()


def jsd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Generalized JSD: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.

    M mixes probabilities, not log-probabilities. The value tends to beta * FKL as beta -> 0 and
    to (1 - beta) * RKL as beta -> 1, but beta = 0 and beta = 1 are plain FKL and RKL (as TRL
    and Liger do), so the value jumps by a factor 1 / beta at the endpoints.
    """
    _check_unit("beta", beta)
    log_p, log_q = _buckets(student, teacher, temperature, stats, "jsd")
    if beta == 0.0:
        return kl_div(log_p, log_q).mean()
    if beta == 1.0:
        return kl_div(log_q, log_p).mean()
    log_m = log_mix(log_p, log_q, beta)  # (N, k+1)
    per_row = beta * kl_div(log_p, log_m) + (1.0 - beta) * kl_div(log_q, log_m)
    return per_row.mean()


def tvd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """1/2 (sum_I |p_i - q_i| + |p_tail - q_tail|): a lower bound on the full TVD.

    The full TVD lies in [this, this + min(p_tail, q_tail)]. `stats["tvd/upper_bound"]` is the
    mean upper end, and `stats["tvd/approx_tail"]` the fraction of rows where the bracket is open.
    """
    log_p, log_q = _buckets(student, teacher, temperature, stats, "tvd")
    p, q = log_p.exp(), log_q.exp()  # (N, k+1)
    lower = 0.5 * (p - q).abs().sum(-1)  # (N,)
    if stats is not None:
        gap = p[:, -1].minimum(q[:, -1]).detach()  # (N,)
        stats["tvd/upper_bound"] = (lower.detach() + gap).mean()
        stats["tvd/approx_tail"] = (gap > 0).float().mean()
    return lower.mean()


def skl(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Skew KL: KL(P || alpha P + (1 - alpha) Q) over (top-k, tail).

    The true KL; DistiLLM's `skewed_forward_kl` logs the cross-entropy instead (larger by H(P),
    same gradient).
    """
    _check_unit("alpha", alpha)
    log_p, log_q = _buckets(student, teacher, temperature, stats, "skl")
    return kl_div(log_p, log_mix(log_p, log_q, alpha)).mean()


def srkl(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Skew reverse KL: KL(Q || (1 - alpha) P + alpha Q) over (top-k, tail), the true KL."""
    _check_unit("alpha", alpha)
    log_p, log_q = _buckets(student, teacher, temperature, stats, "srkl")
    return kl_div(log_q, log_mix(log_p, log_q, 1.0 - alpha)).mean()


_TAIL_T = "exact at T=1 or a stored T, tail tempered as one token otherwise"

_NO_SAMPLED_TAIL = (
    "no sampled-tail variant (as fkl-hybrid is for fkl): its tail term weighs the student's "
    "own tail mass, which teacher draws reach only through q/p weights, unbounded where the "
    "teacher rarely draws, so such an estimate has no variance bound"
)
"""Why rkl and jsd have no fkl-hybrid counterpart (said in `kdcache train --help`)."""


SPECS: dict[str, LossSpec] = {
    "fkl": LossSpec(
        fkl,
        "forward KL to the teacher top-k renormalised to 1 (DistillKit ZERO), x T^2: exact from "
        "the cache at any T, but drops the teacher tail and drives student tail mass to 0",
    ),
    "fkl-tail": LossSpec(
        fkl_tail,
        f"forward KL over top-k + one tail bucket (lower bound on the full KL), x T^2; {_TAIL_T}",
        tail_at_temperature=True,
    ),
    "rkl": LossSpec(
        rkl,
        f"reverse KL over top-k + one tail bucket (lower bound on the full RKL); {_TAIL_T}; "
        f"{_NO_SAMPLED_TAIL}",
        tail_at_temperature=True,
    ),
    "jsd": LossSpec(
        jsd,
        "generalized JSD, M = beta p + (1-beta) q, over top-k + tail bucket (lower bound); "
        f"beta=0 is FKL, beta=1 is RKL; {_TAIL_T}; {_NO_SAMPLED_TAIL}",
        tail_at_temperature=True,
    ),
    "tvd": LossSpec(
        tvd,
        "total variation over top-k + tail bucket: a lower bound, the full TVD is at most "
        f"min(p_tail, q_tail) more; {_TAIL_T}",
        tail_at_temperature=True,
    ),
    "skl": LossSpec(
        skl,
        "skew KL(p || alpha p + (1-alpha) q) over top-k + tail bucket (lower bound on the full "
        f"value; true KL, not DistiLLM's cross-entropy); {_TAIL_T}",
        tail_at_temperature=True,
    ),
    "srkl": LossSpec(
        srkl,
        "skew reverse KL(q || (1-alpha) p + alpha q) over top-k + tail bucket (lower bound on the "
        f"full value; true KL); {_TAIL_T}",
        tail_at_temperature=True,
    ),
}
