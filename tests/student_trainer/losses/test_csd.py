"""CSD: closed form vs the O(V^2) double sum, gradient vs the closed-form and official gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.csd import SPECS, csd

ALL_WEIGHTS = ["".join(p) for p in itertools.product("STU", repeat=2)]


def _weights(kind, s, t_logp, temperature):
    if kind == "S":
        return torch.softmax(s.detach() / temperature, -1)
    if kind == "T":
        return torch.softmax(t_logp, -1)
    return torch.full_like(s, 1.0 / s.shape[-1])


def double_sum(s, t_logp, weights, temperature=1.0):
    """Mean over rows of 1/4 sum_y sum_x w1(y) w2(x) (d_x - d_y)^2, materialising (N, V, V)."""
    w1 = _weights(weights[0], s, t_logp, temperature)
    w2 = _weights(weights[1], s, t_logp, temperature)
    d = s - t_logp
    diff = d.unsqueeze(1) - d.unsqueeze(2)  # [n, y, x] = d_x - d_y
    pair = w1.unsqueeze(2) * w2.unsqueeze(1)  # [n, y, x] = w1(y) w2(x)
    return 0.25 * (pair * diff**2).sum((1, 2)).mean()


def closed_form_grad(s, t_logp, weights, temperature=1.0):
    """Half of dL/ds_z = w2(z)(d_z - E_w1 d) + w1(z)(d_z - E_w2 d), divided by N for the mean."""
    w1 = _weights(weights[0], s, t_logp, temperature)
    w2 = _weights(weights[1], s, t_logp, temperature)
    d = s - t_logp
    e1 = (w1 * d).sum(-1, keepdim=True)
    e2 = (w2 * d).sum(-1, keepdim=True)
    return 0.5 * (w2 * (d - e1) + w1 * (d - e2)) / s.shape[0]


def official_surrogate(s, t_logp, weights):
    """The aailab-kaist/CSD surrogates (csd, csd_weighting_function), as a mean over rows."""
    q = torch.softmax(s, -1)

    def term(w_inner, w_outer):
        d = s - t_logp
        return ((d - (w_inner * d).sum(-1, keepdim=True)).detach() * w_outer.detach() * s).sum(-1)

    if weights == "SS":
        return term(q, q).mean()
    other = _weights(weights[0], s, t_logp, 1.0)
    return (0.5 * (term(other, q) + term(q, other))).mean()


def _data(n=4, v=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s, z, y


@pytest.mark.parametrize("weights", ALL_WEIGHTS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_cache_equals_double_sum_value_and_gradient(weights, temperature):
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1])
    x = s.clone().requires_grad_()
    got = csd(DenseStudent(x), teacher, weights=weights, temperature=temperature)
    (grad,) = torch.autograd.grad(got, x)
    t_logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(
        got, double_sum(s, t_logp, weights, temperature), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        grad, closed_form_grad(s, t_logp, weights, temperature), rtol=1e-5, atol=1e-7
    )
    # Autograd of the O(V^2) double sum (weights detached) gives the same gradient.
    x2 = s.clone().requires_grad_()
    (grad2,) = torch.autograd.grad(double_sum(x2, t_logp, weights, temperature), x2)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weights", ["SS", "TS", "US"])
def test_gradient_equals_official_surrogate(weights):
    s, z, y = _data(seed=1)
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1])
    x = s.clone().requires_grad_()
    (grad,) = torch.autograd.grad(csd(DenseStudent(x), teacher, weights=weights), x)
    x2 = s.clone().requires_grad_()
    t_logp = torch.log_softmax(z, -1)
    (official,) = torch.autograd.grad(official_surrogate(x2, t_logp, weights), x2)
    torch.testing.assert_close(grad, official, rtol=1e-5, atol=1e-7)


def test_ss_value_is_half_the_student_variance_of_d():
    s, z, y = _data(seed=2)
    got = csd(DenseStudent(s), teacher_batch_from_logits(z, y, k=z.shape[1]))
    d = s - torch.log_softmax(z, -1)
    q = torch.softmax(s, -1)
    var = (q * d**2).sum(-1) - (q * d).sum(-1) ** 2
    torch.testing.assert_close(got, 0.5 * var.mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weights", ["SS", "TS", "UT"])
def test_restricted_equals_double_sum_on_the_cached_ids(weights):
    s, z, y = _data(seed=3, v=20)
    teacher = teacher_batch_from_logits(z, y, k=7)
    stats: dict[str, torch.Tensor] = {}
    x = s.clone().requires_grad_()
    got = csd(DenseStudent(x), teacher, weights=weights, stats=stats)
    (grad,) = torch.autograd.grad(got, x)
    s_i = s.gather(1, teacher.ids)
    t_i = torch.log_softmax(z, -1).gather(1, teacher.ids)
    torch.testing.assert_close(got, double_sum(s_i, t_i, weights), rtol=1e-5, atol=1e-6)
    expected = torch.zeros_like(s).scatter(1, teacher.ids, closed_form_grad(s_i, t_i, weights))
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    tail = 1 - torch.softmax(z, -1).gather(1, teacher.ids).sum(-1)
    torch.testing.assert_close(stats["csd/teacher_tail_mass"], tail.mean().float())


@pytest.mark.parametrize("weights", ["SS", "TS", "TU"])
def test_imputed_equals_double_sum_on_a_filled_teacher(weights):
    s, z, y = _data(seed=4, v=20)
    k, v = 7, 20
    teacher = teacher_batch_from_logits(z, y, k=k)
    got = csd(DenseStudent(s), teacher, weights=weights, tail="imputed")
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(k, -1)
    tail = 1 - top_lp.exp().sum(-1, keepdim=True)
    filled = torch.log(tail / (v - k)).expand(-1, v).clone().scatter(1, top_ids, top_lp)
    torch.testing.assert_close(got, double_sum(s, filled, weights), rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift=st.floats(-30, 30),
    weights=st.sampled_from(ALL_WEIGHTS),
    tail=st.sampled_from(["restricted", "imputed"]),
)
def test_zero_value_and_gradient_when_student_is_teacher_plus_constant(seed, shift, weights, tail):
    _, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1])
    x = (z + shift).clone().requires_grad_()
    got = csd(DenseStudent(x), teacher, weights=weights, tail=tail)
    (grad,) = torch.autograd.grad(got, x)
    assert abs(got.item()) < 1e-10
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("tail", ["restricted", "imputed"])
def test_gradcheck_float64_for_student_independent_weights(tail):
    # With S weights the value's gradient is the official stop-gradient one by design (checked
    # above against the closed form); with T and U weights it is the true derivative.
    s, z, y = _data(n=3, v=9, seed=5)
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(4, -1)
    teacher = TeacherBatch(
        ids=top_ids,
        logprobs=top_lp,
        lse=torch.logsumexp(z, -1),
        log_tail=torch.log1p(-top_lp.exp().sum(-1)),
        labels=y,
        label_logprob=lp.gather(1, y[:, None]).squeeze(1),
        vocab_size=9,
    )
    for weights in ("TT", "TU", "UT", "UU"):
        assert torch.autograd.gradcheck(
            lambda x, w=weights: csd(DenseStudent(x), teacher, weights=w, tail=tail),
            (s.clone().requires_grad_(),),
        )


@pytest.mark.parametrize("tail", ["restricted", "imputed"])
def test_dense_and_chunked_students_agree(tail):
    g = torch.Generator().manual_seed(6)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    z = torch.randn(n, v, generator=g) * 2
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=6)
    dense = csd(DenseStudent(h @ w.T), teacher, weights="TS", tail=tail)
    dense_grads = torch.autograd.grad(dense, (h, w))
    chunked = csd(
        ChunkedStudent(h, w, vocab_chunk=5, row_chunk=3), teacher, weights="TS", tail=tail
    )
    chunked_grads = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
    for a, b in zip(dense_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_options_name_the_fix():
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=4)
    with pytest.raises(ValueError, match="two letters"):
        csd(DenseStudent(s), teacher, weights="SX")
    with pytest.raises(ValueError, match="tail"):
        csd(DenseStudent(s), teacher, tail="dense")


def test_spec_lists_the_options():
    spec = SPECS["csd"]
    assert spec.options == {"temperature": 1.0, "weights": "SS", "tail": "restricted"}
    assert "approximate" in spec.summary
    assert math.isfinite(spec.options["temperature"])
