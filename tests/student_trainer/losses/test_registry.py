"""The loss table's metadata: which losses already add a label cross-entropy, and how much."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student_trainer.batch import teacher_batch_from_logits
from student_trainer.losses import LOSSES, LossSpec, resolve_options
from student_trainer.losses._student import DenseStudent


def test_the_losses_with_their_papers_ce_are_declared():
    declared = {name for name, spec in LOSSES.items() if spec.builtin_ce({}) > 0}
    assert declared == {"dkd", "nkd", "gld", "dual-head"}


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if s.ce_option))
def test_the_declared_option_weights_exactly_one_label_cross_entropy(name):
    """Setting the declared option to w changes the loss by (w - default) x CE(labels), so a
    trainer can tell how much CE a loss already holds before it adds its own."""
    spec = LOSSES[name]
    g = torch.Generator().manual_seed(0)
    s, z, aux = (torch.randn(6, 20, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    y = torch.randint(0, 20, (6,), generator=g)
    teacher = teacher_batch_from_logits(z, y, k=8)
    kw = {"aux_student": DenseStudent(aux)} if spec.aux_head else {}
    default = spec.fn(DenseStudent(s), teacher, **kw)
    off = spec.fn(DenseStudent(s), teacher, **kw, **{spec.ce_option: 0.0})
    torch.testing.assert_close(
        default - off, spec.builtin_ce({}) * F.cross_entropy(s, y), rtol=1e-6, atol=1e-6
    )


def test_builtin_ce_reads_the_users_resolved_options():
    assert LOSSES["dkd"].builtin_ce(resolve_options("dkd", {"ce": "0"})) == 0.0
    assert LOSSES["dual-head"].builtin_ce(resolve_options("dual-head", {"gamma": "0.5"})) == 0.5
    assert LOSSES["fkl"].builtin_ce({}) == 0.0


def test_a_ce_option_must_be_one_of_the_losses_options():
    def loss(student, teacher, *, ce: float = 1.0, stats=None):
        return torch.zeros(())

    assert LossSpec(loss, "a loss", ce_option="ce").builtin_ce({"ce": 2.0}) == 2.0
    with pytest.raises(ValueError, match="gamma"):
        LossSpec(loss, "a loss", ce_option="gamma")
