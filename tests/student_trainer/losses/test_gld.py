"""GLD: dense-graph reference, and the graph-matching / GW lower bounds the sorted form promises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.gld import SPECS, gld


def graph(logits, top):
    """(V, V) co-activation graph: mean over rows of the outer product of the sparsified row."""
    vals, ids = logits.topk(top, dim=-1)
    x = torch.zeros_like(logits).scatter(1, ids, vals)
    return x.T @ x / logits.shape[0]


def reference(s, z, top, temperature=1.0):
    g_s, g_t = graph(s / temperature, top), graph(z / temperature, top)
    deg_s, deg_t = g_s.sum(1).sort().values, g_t.sum(1).sort().values
    return ((deg_s - deg_t) ** 2).mean(), g_s, g_t


def _data(n=6, v=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 1
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.randint(0, v, (n,), generator=g)
    return s, z, y


@pytest.mark.parametrize("top,k", [(1, 1), (3, 3), (3, 9), (8, 15)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_dense_graph_reference(top, k, temperature):
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=k)
    got = gld(DenseStudent(s), teacher, top=top, temperature=temperature)
    expected, _, _ = reference(s, z, top, temperature)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lower_bounds_graph_matching_and_gromov_wasserstein():
    s, z, y = _data(seed=1)
    v = z.shape[1]
    got = gld(DenseStudent(s), teacher_batch_from_logits(z, y, k=5), top=4)
    _, g_s, g_t = reference(s, z, 4)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        perm = torch.arange(v) if trial == 0 else torch.randperm(v, generator=g)
        matched = g_t[perm][:, perm]
        assert got.item() <= ((g_s - matched) ** 2).sum().item() + 1e-9
    # GW^2 objective with probability node weights at a few couplings (product and random).
    cost = (g_s[:, None, :, None] - g_t[None, :, None, :]) ** 2  # [i, j, k, l]
    for trial in range(5):
        pi = torch.rand(v, v, generator=g, dtype=torch.float64)
        for _ in range(200):  # Sinkhorn to uniform marginals
            pi = pi / pi.sum(1, keepdim=True) / v
            pi = pi / pi.sum(0, keepdim=True) / v
        if trial == 0:
            pi = torch.full((v, v), 1.0 / v**2, dtype=torch.float64)
        gw = torch.einsum("ijkl,ij,kl->", cost, pi, pi)
        assert got.item() / v**2 <= gw.item() + 1e-12


def test_zero_when_the_student_has_the_teachers_raw_logits_and_not_shift_invariant():
    _, z, y = _data(seed=2)
    teacher = teacher_batch_from_logits(z, y, k=6)
    assert gld(DenseStudent(z), teacher, top=6).item() < 1e-9
    assert gld(DenseStudent(z + 5.0), teacher, top=6).item() > 1e-3  # outer products see raw levels


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), top=st.integers(1, 6))
def test_invariant_to_relabelling_the_student_vocabulary(seed, top):
    s, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=6)
    perm = torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        gld(DenseStudent(s), teacher, top=top),
        gld(DenseStudent(s[:, perm]), teacher, top=top),
        rtol=1e-9,
        atol=1e-9,
    )


def test_gradcheck_float64():
    s, z, y = _data(n=4, v=8, seed=3)
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(4, -1)
    teacher = TeacherBatch(
        ids=top_ids,
        logprobs=top_lp,
        lse=torch.logsumexp(z, -1),
        log_tail=torch.log1p(-top_lp.exp().sum(-1)),
        labels=y,
        label_logprob=lp.gather(1, y[:, None]).squeeze(1),
        vocab_size=8,
    )
    assert torch.autograd.gradcheck(
        lambda x: gld(DenseStudent(x), teacher, top=3), (s.clone().requires_grad_(),)
    )


def test_dense_and_chunked_students_agree():
    g = torch.Generator().manual_seed(6)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    z = torch.randn(n, v, generator=g) * 2
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=6)
    stats: dict[str, torch.Tensor] = {}
    dense = gld(DenseStudent(h @ w.T), teacher, top=4, stats=stats)
    dense_grads = torch.autograd.grad(dense, (h, w))
    chunked = gld(ChunkedStudent(h, w, vocab_chunk=5, row_chunk=3), teacher, top=4)
    chunked_grads = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
    for a, b in zip(dense_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert 0.0 <= stats["gld/top_overlap"].item() <= 1.0


def test_bad_top_names_the_fix():
    s, z, y = _data()
    with pytest.raises(ValueError, match="top-k"):
        gld(DenseStudent(s), teacher_batch_from_logits(z, y, k=4), top=8)


def test_spec_lists_the_options():
    spec = SPECS["gld"]
    assert spec.options == {"temperature": 1.0, "top": 8}
    assert "unverified" in spec.summary
