"""Losses through the lm_head in row blocks against the same losses on the whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses import LOSSES
from student_trainer.losses._rowblock import row_block_size, row_blocked_loss
from student_trainer.losses._student import DenseStudent
from student_trainer.losses.zloss import cross_entropy, z_loss

PER_TOKEN = sorted(name for name, spec in LOSSES.items() if spec.per_token)


def _setup(n: int = 13, v: int = 29, d: int = 6, dtype=torch.float64, seed: int = 0, k: int = 10):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = teacher_batch_from_logits(
        torch.randn(n, v, generator=g, dtype=torch.float64).float() * 2,
        labels,
        k,
        num_samples=7,
        generator=g,
    )
    return h, w, b, teacher


def _loss(name: str, h: Tensor, w: Tensor, b: Tensor, teacher: TeacherBatch) -> Tensor:
    """The registered loss + 0.5 CE; a second head (w reversed along d) where the loss has one."""
    student = DenseStudent(F.linear(h, w, b))
    extra = {"aux_student": DenseStudent(h @ w.flip(1).T)} if LOSSES[name].aux_head else {}
    return LOSSES[name].fn(student, teacher, **extra) + 0.5 * cross_entropy(student, teacher.labels)


def _blocked(name: str, h: Tensor, w: Tensor, b: Tensor, teacher: TeacherBatch, rows: int):
    def block_loss(hb: Tensor, wb: Tensor, bb: Tensor, *, rows: slice) -> Tensor:
        return _loss(name, hb, wb, bb, teacher.select(rows))

    return row_blocked_loss(block_loss, h, w, b, rows_per_block=rows)


@pytest.mark.parametrize("name", PER_TOKEN)
@pytest.mark.parametrize("rows", [1, 4, 13, 50])
def test_blocks_give_the_whole_loss_and_its_gradients(name: str, rows: int) -> None:
    h, w, b, teacher = _setup()
    want = _loss(name, h, w, b, teacher)
    want_grads = torch.autograd.grad(want, (h, w, b))
    got = _blocked(name, h, w, b, teacher, rows)
    got_grads = torch.autograd.grad(got * 3.0, (h, w, b))  # the backward scales by grad_out
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, 3.0 * e, rtol=1e-9, atol=1e-11)


def test_gradcheck_and_absent_or_frozen_parameters() -> None:
    h, w, b, teacher = _setup(n=5, v=7, d=3, k=3)
    torch.autograd.gradcheck(lambda h, w, b: _blocked("fkl", h, w, b, teacher, 2), (h, w, b))

    def no_bias(hb: Tensor, wb: Tensor, bb: None, *, rows: slice) -> Tensor:
        assert bb is None
        return z_loss(DenseStudent(hb @ wb.T), teacher.select(rows), coefficient=1.0)

    frozen = w.detach()
    loss = row_blocked_loss(no_bias, h, frozen, None, rows_per_block=2)
    (gh,) = torch.autograd.grad(loss, (h,))
    ref = z_loss(DenseStudent(h @ frozen.T), teacher, coefficient=1.0)
    torch.testing.assert_close(gh, torch.autograd.grad(ref, (h,))[0])


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if not s.per_token))
def test_losses_marked_across_rows_are_not_row_separable(name: str) -> None:
    """The flag is real: a loss that pools the batch (gld's graphs) changes when cut in blocks,
    so the trainer must not run it in row blocks."""
    h, w, b, teacher = _setup()
    whole = _loss(name, h, w, b, teacher)
    assert not torch.allclose(_blocked(name, h, w, b, teacher, 1), whole)


def test_bfloat16_hidden_states_give_float32_loss() -> None:
    h, w, b, teacher = _setup(dtype=torch.float32)
    hb = h.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it
        loss = _blocked("fkl", hb, w, b, teacher, 4)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_row_block_size() -> None:
    assert row_block_size(32000) == 524
    assert row_block_size(128256) == 130
    assert row_block_size(10**9) == 1
    assert row_block_size(100, budget=1000) == 10


def test_dense_logprobs_and_lse_backward_match_autograd_with_repeated_ids() -> None:
    """DenseStudent's fused backwards (one softmax, scatter in place) against plain autograd;
    ids repeat, as sample padding does."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (6, 4), generator=g)
    ids[:, 3] = ids[:, 0]
    torch.autograd.gradcheck(lambda z: DenseStudent(z).logprobs_at(ids), (z,))
    torch.autograd.gradcheck(lambda z: DenseStudent(z).lse(), (z,))
    weights = torch.randn(6, 4, generator=g, dtype=torch.float64)
    fused = torch.autograd.grad((DenseStudent(z).logprobs_at(ids) * weights).sum(), z)[0]
    plain = torch.autograd.grad((torch.log_softmax(z, -1).gather(-1, ids) * weights).sum(), z)[0]
    torch.testing.assert_close(fused, plain)
