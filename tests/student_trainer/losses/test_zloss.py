"""PaLM z-loss and label cross-entropy against dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from student_trainer.batch import teacher_batch_from_logits
from student_trainer.losses import zloss
from student_trainer.losses._student import ChunkedStudent, DenseStudent, StudentLogits


def _teacher(n: int, v: int):
    return teacher_batch_from_logits(torch.randn(n, v), torch.zeros(n, dtype=torch.long), 2)


@pytest.mark.parametrize("coefficient", [1e-4, 0.3])
def test_z_loss_value_and_gradient(coefficient: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 3 + 2).requires_grad_()
    stats: dict[str, Tensor] = {}
    got = zloss.z_loss(DenseStudent(s), _teacher(5, 9), coefficient=coefficient, stats=stats)
    lse = torch.log(torch.exp(s.detach()).sum(-1))
    torch.testing.assert_close(got.detach(), coefficient * (lse**2).mean())
    torch.testing.assert_close(stats["z-loss/mean_lse"], lse.mean())
    (grad,) = torch.autograd.grad(got, s)
    want = 2 * coefficient * lse[:, None] * torch.softmax(s.detach(), -1) / 5
    torch.testing.assert_close(grad, want)


def test_z_loss_ignores_teacher_and_temperature() -> None:
    s = torch.randn(4, 7)
    a = zloss.z_loss(DenseStudent(s), _teacher(4, 7))
    b = zloss.z_loss(DenseStudent(s), _teacher(4, 7), temperature=3.0)
    torch.testing.assert_close(a, b)


def test_cross_entropy_matches_torch() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (6,), generator=g)
    got = zloss.cross_entropy(DenseStudent(s), labels)
    want = F.cross_entropy(s, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2])
    teacher = _teacher(3, 6)
    assert torch.autograd.gradcheck(
        lambda s: zloss.z_loss(DenseStudent(s), teacher, coefficient=0.5), (s,)
    )
    assert torch.autograd.gradcheck(lambda s: zloss.cross_entropy(DenseStudent(s), labels), (s,))


def test_chunked_student_gives_the_same_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    n, v, d = 7, 19, 5
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = _teacher(n, v)

    def run(student: StudentLogits) -> tuple[Tensor, ...]:
        z = zloss.z_loss(student, teacher, coefficient=0.1)
        ce = zloss.cross_entropy(student, labels)
        return (z, ce, *torch.autograd.grad(z + ce, (h, w, b)))

    chunked = run(ChunkedStudent(h, w, b, vocab_chunk=4, row_chunk=3))
    for got, want in zip(chunked, run(DenseStudent(h @ w.T + b)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_specs_table() -> None:
    spec = zloss.SPECS["z-loss"]
    assert spec.options == {"temperature": 1.0, "coefficient": 1e-4}
    assert not spec.needs_samples and "\n" not in spec.summary


def test_ce_baseline_equals_dense_cross_entropy() -> None:
    import torch

    from student_trainer.batch import teacher_batch_from_logits
    from student_trainer.losses._student import DenseStudent
    from student_trainer.losses.zloss import ce

    torch.manual_seed(0)
    s, z = torch.randn(6, 11), torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    got = ce(DenseStudent(s), teacher_batch_from_logits(z, labels, 3))
    assert torch.allclose(got, torch.nn.functional.cross_entropy(s, labels))
