"""CSD: the logit-difference (score) matching loss of aailab-kaist/CSD, in closed form.

With `d = s - z` (student minus teacher logits; a per-row constant cancels, so teacher log-probs
stand in for `z`) and detached weights `w1, w2` (each a distribution over the ids in play):

    L = 1/2 * sum_y sum_x w1(y) w2(x) (d_x - d_y)^2          (O(V^2) as written)
    dL/ds_z = w2(z) (d_z - E_w1[d]) + w1(z) (d_z - E_w2[d])   (linear time)

The official code trains on a surrogate whose value is not `L` but whose gradient is exactly
`dL/2`. This module returns `L / 2`, computed in linear time, so its value is a true objective
(for (S, S) it is `Var_q(d) / 2`) and autograd gives exactly the official gradient.

Weights: S = detached student softmax at `temperature` (only the student weights see the
temperature, as in the official `csd`), T = teacher probabilities, U = uniform.

From the cache (approximate either way; the teacher tail mass goes to `stats`):
* ``tail="restricted"`` (default): everything over the cached ids I, weights renormalised on I.
  Needs only `student.gather(I)`.
* ``tail="imputed"``: the full vocabulary, teacher log-prob `log(p_tail / (V - k))` on every id
  outside I. Needs the full student logits (`student.full()`): an O(N V) pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits

WEIGHT_KINDS = "STU"
TAILS = ("restricted", "imputed")


def csd(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 1.0,
    weights: str = "SS",
    tail: str = "restricted",
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of `L / 2` for weights `w1 w2` (e.g. "SS", "TS", "US"); see the module doc.

    Defaults follow the official general-chat setting: (S, S), temperature 1.
    """
    if len(weights) != 2 or any(c not in WEIGHT_KINDS for c in weights):
        raise ValueError(
            f"csd: weights={weights!r}; give two letters from S (student), T (teacher), "
            f"U (uniform), e.g. weights=SS or weights=TS"
        )
    if tail not in TAILS:
        raise ValueError(f"csd: tail={tail!r}; use one of {', '.join(TAILS)}")

    if tail == "restricted" or teacher.k == teacher.vocab_size:
        s = student.gather(teacher.ids)  # (N, k)
        t_logp = teacher.logprobs.to(s.dtype)  # (N, k)
        # Teacher probabilities renormalised on I (a no-op when k = V).
        t_weight = torch.softmax(t_logp, dim=-1)
    else:
        s = student.full()  # (N, V): imputation needs the student's whole vocabulary
        fill = teacher.log_tail.to(s.dtype) - math.log(teacher.vocab_size - teacher.k)
        t_logp = (
            fill.unsqueeze(-1).expand_as(s).scatter(1, teacher.ids, teacher.logprobs.to(s.dtype))
        )
        t_weight = t_logp.exp()
    d = s - t_logp  # (N, j) with j = k or V

    def weight(kind: str) -> Tensor:
        if kind == "S":
            return torch.softmax(s.detach() / temperature, dim=-1)
        if kind == "T":
            return t_weight
        return torch.full_like(s, 1.0 / s.shape[-1])

    w1, w2 = weight(weights[0]), weight(weights[1])
    # Centre by a detached constant for round-off only: the expression below is exactly
    # 1/4 sum_xy w1(y) w2(x) (d_x - d_y)^2 for any centre.
    e = d - (w2 * d).sum(-1, keepdim=True).detach()
    m1, m2 = (w1 * e).sum(-1), (w2 * e).sum(-1)
    per_row = 0.25 * ((w1 * e * e).sum(-1) + (w2 * e * e).sum(-1) - 2.0 * m1 * m2)  # (N,)

    if stats is not None:
        stats["csd/teacher_tail_mass"] = teacher.log_tail.exp().mean().detach()
    return per_row.mean()


SPECS: dict[str, LossSpec] = {
    "csd": LossSpec(
        csd,
        "CSD logit-difference matching (S,S weights, T=1), value L/2 with the official gradient; "
        "approximate: restricted to the cached ids, or tail imputed uniformly (full logits)",
    ),
}
