"""BiLD: bi-directional logits difference loss (Li et al. 2024, fpcsong/BiLD `bild_loss`).

For one position and a set of `top` ids in a fixed order, take the `top * (top - 1) / 2` pairwise
differences `x_i - x_j` (i < j) of the teacher values and of the student logits, turn each list
into a distribution with a softmax, and take `KL(teacher || student)` between the two.

* t-LD uses the teacher's top ids. Differences cancel the teacher's log-sum-exp, so cached
  log-probs stand in for raw logits and t-LD is exact from the cache whenever `top <= k`.
* s-LD uses the student's top ids and needs the teacher's value at each of them. An id missing
  from the cached top-k is imputed (`impute`), and the fraction of such ids goes to `stats`.

BiLD = t-LD + s-LD, mean over rows, no `T^2` factor (as in the official code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch
from student_trainer.losses._registry import LossSpec
from student_trainer.losses._student import StudentLogits

IMPUTATIONS = ("min", "uniform", "skip")


def bild(
    student: StudentLogits,
    teacher: TeacherBatch,
    *,
    temperature: float = 3.0,
    top: int = 8,
    impute: str = "min",
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean over rows of t-LD + s-LD at `temperature` over `top` ids (paper: top=8, T=3).

    `impute` says what teacher value an s-LD id outside the cached top-k gets:

    * ``"min"`` (default): the smallest cached log-prob, an upper bound on the true value (every
      id outside the top-k is at most as likely as the k-th), so the imputed target never
      exaggerates how much the teacher dislikes a token the student ranks high;
    * ``"uniform"``: ``log(p_tail / (V - k))``, the tail mass spread evenly;
    * ``"skip"``: rows with any missing id contribute no s-LD (still divided by all N rows).
    """
    if impute not in IMPUTATIONS:
        raise ValueError(f"bild: impute={impute!r}; use one of {', '.join(IMPUTATIONS)}")
    if not 2 <= top <= teacher.k:
        raise ValueError(
            f"bild: top={top} needs 2 <= top <= k={teacher.k} (the cached top-k); "
            f"lower --loss-option top=..., or rebuild the cache with a larger --top-k"
        )
    # t-LD: teacher-led, the first `top` cached ids in the teacher's rank order.
    t_ids = teacher.ids[:, :top]  # (N, top)
    t_ld = _logit_difference_kl(teacher.logprobs[:, :top], student.gather(t_ids), temperature)

    # s-LD: student-led, the student's own top ids (no gradient through the choice).
    s_ids = student.topk_ids(top)  # (N, top)
    match = s_ids.unsqueeze(-1) == teacher.ids.unsqueeze(1)  # (N, top, k)
    found = match.any(-1)  # (N, top)
    cached = torch.where(match, teacher.logprobs.unsqueeze(1), -torch.inf).amax(-1)  # (N, top)
    if impute == "uniform" and teacher.vocab_size > teacher.k:
        fill = teacher.log_tail - math.log(teacher.vocab_size - teacher.k)  # (N,)
    else:
        fill = teacher.logprobs.amin(-1)  # (N,): also a safe placeholder for "skip"
    t_vals = torch.where(found, cached, fill.unsqueeze(-1))  # (N, top)
    s_ld = _logit_difference_kl(t_vals, student.gather(s_ids), temperature)
    row_complete = found.all(-1)  # (N,)
    if impute == "skip":
        s_ld = torch.where(row_complete, s_ld, torch.zeros_like(s_ld))

    if stats is not None:
        stats["bild/sld_imputed"] = (~found).float().mean().detach()
        stats["bild/sld_rows_affected"] = (~row_complete).float().mean().detach()
        stats["bild/t_ld"] = t_ld.mean().detach()
        stats["bild/s_ld"] = s_ld.mean().detach()
    return (t_ld + s_ld).mean()


def _logit_difference_kl(teacher_vals: Tensor, student_vals: Tensor, temperature: float) -> Tensor:
    """(N,) KL(softmax(pairwise diffs of teacher) || softmax(pairwise diffs of student)).

    Both inputs are (N, j) values at the same ids in the same order; pairs are i < j.
    """
    j = teacher_vals.shape[-1]
    first, second = torch.triu_indices(j, j, offset=1, device=teacher_vals.device)
    a = teacher_vals / temperature
    b = student_vals / temperature
    log_pa = torch.log_softmax(a[:, first] - a[:, second], dim=-1)  # (N, j(j-1)/2)
    log_pb = torch.log_softmax(b[:, first] - b[:, second], dim=-1)
    return (log_pa.exp() * (log_pa - log_pb)).sum(-1)


SPECS: dict[str, LossSpec] = {
    "bild": LossSpec(
        bild,
        "BiLD: KL over top-8 pairwise logit differences, teacher-led + student-led (T=3); "
        "t-LD exact, s-LD imputes teacher values for student top ids outside the cache",
    ),
}
