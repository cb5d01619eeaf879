"""log1mexp, bucket builders and the safe divergences, against high-precision and dense references."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._logspace import (
    approx_temperature_rows,
    entropy,
    kl_div,
    log1mexp,
    log_mix,
    log_tail_from_head,
    soft_cross_entropy,
    student_bucket,
    teacher_bucket,
    teacher_logprobs,
)
from student_trainer.losses._student import DenseStudent

INF = math.inf


def _mp_log1mexp(x: float) -> float:
    if x == -INF:
        return 0.0
    if x == 0.0:
        return -INF
    # The naive formula, at a precision (400 digits) that resolves 1 - exp(x) for |x| >= 1e-300
    # and exp(x) for x >= -800.
    with mpmath.workdps(400):
        return float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x))))


def _dense_bucket(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, k+1) log-probs of the top-k ids and of the rest, straight from dense logits."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    head = logp.gather(-1, ids)
    tail = logp.scatter(-1, ids, -INF).logsumexp(-1, keepdim=True)
    return torch.cat([head, tail], dim=-1)


# --- log1mexp -------------------------------------------------------------------------------

X_GRID = [-INF, -800.0, -50.0, -5.0, -0.7, -math.log(2), -0.69, -0.1, -1e-5, -1e-20, -1e-300, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_matches_high_precision(dtype: torch.dtype) -> None:
    xs = [x for x in X_GRID if dtype == torch.float64 or x == 0 or abs(x) > 1e-38]
    got = log1mexp(torch.tensor(xs, dtype=dtype))
    want = torch.tensor(
        [_mp_log1mexp(float(torch.tensor(x, dtype=dtype))) for x in xs], dtype=dtype
    )
    assert got.dtype == dtype
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=tol, atol=0.0)
    assert got[0] == 0.0 and got[-1] == -INF


def test_log1mexp_beats_the_naive_formula_at_both_ends() -> None:
    x = torch.tensor([-1e-20, -50.0], dtype=torch.float64)
    naive = torch.log(1 - torch.exp(x))
    assert naive[0] == -INF and naive[1] == 0.0  # both wrong
    got = log1mexp(x)
    assert math.isclose(got[0].item(), math.log(1e-20), rel_tol=1e-12)
    assert math.isclose(got[1].item(), -math.exp(-50.0), rel_tol=1e-12)


def test_log1mexp_gradient_is_finite_and_exact() -> None:
    x = torch.tensor([-INF, -700.0, -3.0, -0.5, -1e-8], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log1mexp(x).sum(), x)
    assert not grad.isnan().any()
    assert grad[0] == 0.0
    want = -1.0 / torch.expm1(-x[1:].detach())  # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    torch.testing.assert_close(grad[1:], want, rtol=1e-12, atol=1e-300)
    assert torch.autograd.gradcheck(
        log1mexp, (torch.linspace(-20, -1e-3, 25, dtype=torch.float64).requires_grad_(),)
    )


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=-700.0, max_value=-1e-300, allow_subnormal=False))
def test_log1mexp_property(x: float) -> None:
    got = log1mexp(torch.tensor(x, dtype=torch.float64)).item()
    assert math.isclose(got, _mp_log1mexp(x), rel_tol=1e-13)


# --- tails and buckets ------------------------------------------------------------------------


def test_log_tail_from_head_against_complement() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 12, dtype=torch.float64) * 3
    logp = torch.log_softmax(logits, -1)
    ids = logp.topk(4, -1).indices
    got = log_tail_from_head(logp.gather(-1, ids), covers_vocab=False)
    want = logp.scatter(-1, ids, -INF).logsumexp(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    full = log_tail_from_head(logp, covers_vocab=True)
    assert (full == -INF).all()


def test_log_tail_floor_when_head_rounds_above_one() -> None:
    """Rounding can make the head mass >= 1: the tail reads as eps, never NaN or -inf."""
    head = torch.tensor([[0.0, -30.0], [1e-6, -40.0]], requires_grad=True)
    tail = log_tail_from_head(head, covers_vocab=False)
    floor = math.log(torch.finfo(torch.float32).eps)
    torch.testing.assert_close(tail, torch.full((2,), floor), rtol=1e-3, atol=0.0)
    (grad,) = torch.autograd.grad(tail.sum(), head)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("k", [1, 5, 10])
def test_teacher_bucket_at_t1_and_stored_t_is_exact(k: int) -> None:
    torch.manual_seed(1)
    z = torch.randn(7, 10) * 2
    teacher = teacher_batch_from_logits(
        z, torch.zeros(7, dtype=torch.long), k, temperatures=(0.5, 2.0)
    )
    for t in (1.0, 0.5, 2.0):
        got = teacher_bucket(teacher, t)
        want = _dense_bucket(z, teacher.ids, t).float()
        torch.testing.assert_close(got[:, :k], want[:, :k], rtol=1e-5, atol=1e-5)
        # At a stored T != 1 the tail is 1 - (tempered head mass): float32 resolves it to about
        # 1e-6 in probability, not in log-probability (a small tail loses relative precision).
        torch.testing.assert_close(got[:, k:].exp(), want[:, k:].exp(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[:, :k], teacher_logprobs(teacher, t), rtol=0, atol=0)
        torch.testing.assert_close(got.logsumexp(-1), torch.zeros(7), rtol=0, atol=1e-5)
        assert approx_temperature_rows(teacher, t).item() == 0.0
    if k == 10:
        assert (teacher_bucket(teacher, 2.0)[:, -1] == -INF).all()


def test_teacher_logprobs_refuses_an_unstored_temperature() -> None:
    teacher = teacher_batch_from_logits(torch.randn(2, 6), torch.zeros(2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="not stored"):
        teacher_logprobs(teacher, 2.0)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_teacher_bucket_fallback_tempers_the_tail_as_one_token(temperature: float) -> None:
    torch.manual_seed(2)
    z = torch.randn(8, 20) * 2
    teacher = teacher_batch_from_logits(z, torch.zeros(8, dtype=torch.long), 5)
    got = teacher_bucket(teacher, temperature).double()
    # One-token tail: p_i^(1/T) and p_tail^(1/T), renormalised.
    p = _dense_bucket(z, teacher.ids).exp()
    powered = p ** (1.0 / temperature)
    want = (powered / powered.sum(-1, keepdim=True)).log()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = _dense_bucket(z, teacher.ids, temperature)
    if temperature > 1:  # sum of p_x^(1/T) >= (sum p_x)^(1/T): the tail is underestimated
        assert (got[:, -1] <= exact[:, -1] + 1e-6).all()
    assert approx_temperature_rows(teacher, temperature).item() == 1.0


def test_approx_rows_counts_only_rows_with_a_tail() -> None:
    z = torch.randn(4, 6)
    full = teacher_batch_from_logits(z, torch.zeros(4, dtype=torch.long), 6)
    assert approx_temperature_rows(full, 2.0).item() == 0.0
    torch.testing.assert_close(
        teacher_bucket(full, 2.0)[:, :6], torch.log_softmax(full.logprobs / 2.0, -1)
    )
    partial = teacher_batch_from_logits(z, torch.zeros(4, dtype=torch.long), 3)
    mixed = TeacherBatch(
        ids=torch.cat([full.ids[:1, :3], partial.ids[1:]]),
        logprobs=torch.cat([full.logprobs[:1, :3], partial.logprobs[1:]]),
        lse=partial.lse,
        log_tail=torch.tensor([-INF, *partial.log_tail[1:].tolist()]),
        labels=partial.labels,
        label_logprob=partial.label_logprob,
        vocab_size=6,
    )
    assert approx_temperature_rows(mixed, 3.0).item() == 0.75


@pytest.mark.parametrize("k", [1, 4, 9])
def test_student_bucket_matches_dense(k: int) -> None:
    torch.manual_seed(3)
    s = torch.randn(5, 9) * 2
    ids = torch.randn(5, 9).topk(k, -1).indices
    got = student_bucket(DenseStudent(s), ids)
    torch.testing.assert_close(got.double(), _dense_bucket(s, ids), rtol=1e-5, atol=1e-5)
    if k == 9:
        assert (got[:, -1] == -INF).all()


def test_student_bucket_gradcheck_float64() -> None:
    torch.manual_seed(4)
    s = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randn(3, 8).topk(3, -1).indices
    assert torch.autograd.gradcheck(lambda s: student_bucket(DenseStudent(s), ids), (s,))
    # Tail gradient: d log q_tail / d s = -q on I, q_x / q_tail - q_x on the tail.
    tail = student_bucket(DenseStudent(s), ids)[:, -1]
    (grad,) = torch.autograd.grad(tail.sum(), s)
    q = torch.softmax(s.detach(), -1)
    in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    q_tail = q.masked_fill(in_top, 0).sum(-1, keepdim=True)
    want = torch.where(in_top, -q, q / q_tail - q)
    torch.testing.assert_close(grad, want)


# --- safe divergences -------------------------------------------------------------------------


def test_kl_and_entropy_with_zero_probabilities() -> None:
    log_p = torch.tensor(
        [[math.log(0.5), math.log(0.5), -INF], [0.0, -INF, -INF]], dtype=torch.float64
    )
    log_q = torch.tensor(
        [[math.log(0.25), math.log(0.25), math.log(0.5)], [-1e-9, -INF, -21.0]], dtype=torch.float64
    ).requires_grad_()
    log_p = log_p.clone().requires_grad_()
    kl = kl_div(log_p, log_q)
    torch.testing.assert_close(kl[0], torch.tensor(math.log(2.0), dtype=torch.float64))
    torch.testing.assert_close(kl[1], torch.tensor(1e-9, dtype=torch.float64))
    torch.testing.assert_close(
        entropy(log_p.detach()), torch.tensor([math.log(2.0), 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        soft_cross_entropy(log_p.detach(), log_q.detach()), kl.detach() + entropy(log_p.detach())
    )
    gp, gq = torch.autograd.grad(kl.sum(), (log_p, log_q))
    assert torch.isfinite(gp).all() and torch.isfinite(gq).all()
    assert (gq[log_p.detach() == -INF] == 0).all() and (gp[log_p.detach() == -INF] == 0).all()
    torch.testing.assert_close(gq[0, :2], torch.tensor([-0.5, -0.5], dtype=torch.float64))


def test_kl_is_infinite_where_q_misses_mass() -> None:
    log_p = torch.log(torch.tensor([0.5, 0.5]))
    log_q = torch.tensor([0.0, -INF])
    assert kl_div(log_p, log_q).item() == INF


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 1.0])
def test_log_mix(weight: float) -> None:
    log_p = torch.tensor([math.log(0.2), -INF, -INF, math.log(0.8)], dtype=torch.float64)
    log_q = torch.tensor([math.log(0.5), math.log(0.5), -INF, -INF], dtype=torch.float64)
    log_p.requires_grad_()
    log_q.requires_grad_()
    got = log_mix(log_p, log_q, weight)  # at weight 0 or 1 one input is simply not used
    want = (weight * log_p.detach().exp() + (1 - weight) * log_q.detach().exp()).log()
    torch.testing.assert_close(got.detach(), want)
    # A loss that weights the p = q = 0 entry by 0 must get finite gradients.
    live = torch.isfinite(got.detach())
    gp, gq = torch.autograd.grad(
        got.masked_fill(~live, 0.0).sum(), (log_p, log_q), allow_unused=True, materialize_grads=True
    )
    assert torch.isfinite(gp).all() and torch.isfinite(gq).all()
    assert gp[2] == 0 and gq[2] == 0
    if 0 < weight < 1:  # d log m / d log p = w p / m
        torch.testing.assert_close(gp[0], weight * 0.2 / want[0].exp())
