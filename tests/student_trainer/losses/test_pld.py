"""PLD against an independent full-vocabulary Plackett-Luce implementation (paper Appendix C form)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.pld import SPECS, pld


def reference_steps(s, z, y, tau):
    """(N, V) per-step weighted NLL of the full Plackett-Luce loss, one row at a time.

    Ranking: the label first, then every other class by descending teacher logit. Weights:
    the teacher's softmax at tau, at each ranked class.
    """
    rows = []
    for n in range(s.shape[0]):
        others = [c for c in torch.argsort(z[n], descending=True).tolist() if c != y[n].item()]
        order = torch.tensor([y[n].item(), *others])
        alpha = torch.softmax(z[n] / tau, 0)[order]
        ranked = s[n][order]
        # Ascending order of the list's tail: log sum_{l >= j} exp(ranked[l]).
        denom = torch.stack([torch.logsumexp(ranked[j:], 0) for j in range(len(order))])
        rows.append(alpha * (denom - ranked))
    return torch.stack(rows)


def _data(n=5, v=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s, z, y


@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("store_lse", [True, False])
def test_full_cache_equals_full_plackett_luce(tau, store_lse):
    s, z, y = _data()
    temps = (tau,) if store_lse and tau != 1.0 else ()
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1], temperatures=temps)
    stats: dict[str, torch.Tensor] = {}
    got = pld(DenseStudent(s), teacher, temperature=tau, stats=stats)
    expected = reference_steps(s, z, y, tau).sum(-1).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert stats["pld/dropped_weight"].item() < 1e-6
    assert stats["pld/alpha_approx_rows"].item() == 0.0  # no tail: even the fallback is exact


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_truncated_equals_full_steps_on_the_prefix(tau):
    s, z, y = _data(n=8, v=20, seed=1)
    k = 6
    teacher = teacher_batch_from_logits(z, y, k=k, temperatures=(tau,) if tau != 1.0 else ())
    label_inside = (teacher.ids == y[:, None]).any(-1)
    assert label_inside.any() and (~label_inside).any(), "need rows of both kinds"
    stats: dict[str, torch.Tensor] = {}
    got = pld(DenseStudent(s), teacher, temperature=tau, stats=stats)
    steps = reference_steps(s, z, y, tau)
    prefix_len = torch.where(label_inside, k, k + 1)
    keep = torch.arange(z.shape[1]) < prefix_len[:, None]
    torch.testing.assert_close(got, (steps * keep).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    assert got.item() < steps.sum(-1).mean().item()  # dropped steps are non-negative
    # The dropped weight is the teacher mass outside the label and the top-k.
    alpha = torch.softmax(z / tau, -1)
    kept = alpha.gather(1, teacher.ids).sum(-1) + torch.where(
        label_inside, 0.0, alpha.gather(1, y[:, None]).squeeze(1)
    )
    torch.testing.assert_close(
        stats["pld/dropped_weight"], (1 - kept).mean().float(), rtol=1e-4, atol=1e-6
    )
    assert stats["pld/label_outside_cache"].item() == pytest.approx(
        (~label_inside).double().mean().item()
    )


def test_temperature_fallback_is_close_and_flagged():
    s, z, y = _data(n=6, v=30, seed=2)
    exact = pld(
        DenseStudent(s), teacher_batch_from_logits(z, y, k=10, temperatures=(2.0,)), temperature=2.0
    )
    stats: dict[str, torch.Tensor] = {}
    approx = pld(
        DenseStudent(s), teacher_batch_from_logits(z, y, k=10), temperature=2.0, stats=stats
    )
    assert stats["pld/alpha_approx_rows"].item() == 1.0
    # The one-token tail under-counts the tail at tau > 1, so the prefix weights grow.
    assert approx.item() > exact.item()
    assert approx.item() < 2 * exact.item()


def test_onehot_alpha_gives_cross_entropy():
    s, _, y = _data(seed=3)
    n, v = s.shape
    ids = torch.stack(
        [torch.roll(torch.arange(v), -int(label) - 1)[:4] for label in y]
    )  # y not in I
    teacher = TeacherBatch(
        ids=ids,
        logprobs=torch.full((n, 4), -1e4, dtype=torch.float64),
        lse=torch.zeros(n, dtype=torch.float64),
        log_tail=torch.zeros(n, dtype=torch.float64),
        labels=y,
        label_logprob=torch.zeros(n, dtype=torch.float64),
        vocab_size=v,
    )
    ce = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(pld(DenseStudent(s), teacher), ce, rtol=1e-10, atol=1e-10)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-40, 40), k=st.integers(1, 14))
def test_invariant_to_shifting_the_student(seed, shift, k):
    s, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=k)
    rows = torch.linspace(-1, 1, s.shape[0], dtype=s.dtype).unsqueeze(-1)
    torch.testing.assert_close(
        pld(DenseStudent(s), teacher),
        pld(DenseStudent(s + shift * rows), teacher),
        rtol=1e-6,
        atol=1e-6,
    )


def test_gradcheck_float64():
    s, z, y = _data(n=4, v=9, seed=4)
    y[0] = z[0].argmax()  # one row with the label inside the cache, at rank 1
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
    assert torch.autograd.gradcheck(
        lambda x: pld(DenseStudent(x), teacher), (s.clone().requires_grad_(),)
    )
    full = teacher_batch_from_logits(z, y, k=9)
    full = replace(full, logprobs=full.logprobs.double(), lse=full.lse.double())
    assert torch.autograd.gradcheck(
        lambda x: pld(DenseStudent(x), full), (s.clone().requires_grad_(),)
    )


def test_dense_and_chunked_students_agree():
    g = torch.Generator().manual_seed(6)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    z = torch.randn(n, v, generator=g) * 2
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=6)
    dense = pld(DenseStudent(h @ w.T), teacher)
    dense_grads = torch.autograd.grad(dense, (h, w))
    chunked = pld(ChunkedStudent(h, w, vocab_chunk=5, row_chunk=3), teacher)
    chunked_grads = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
    for a, b in zip(dense_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_spec_lists_the_options():
    spec = SPECS["pld"]
    assert spec.options == {"temperature": 1.0}
    assert "approximate" in spec.summary
