"""GLD: dense-graph reference, the GW lower bound the sorted form promises, and that it teaches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.gld import SPECS, gld


def graph(vals):
    """(top, top) co-activation graph of rows `vals` (N, top): the mean outer product, built
    explicitly (node i = column i)."""
    return (vals.unsqueeze(-1) * vals.unsqueeze(-2)).mean(0)


def reference(s, z, top, *, own_top=False):
    """The framework figure's GW~ / top^2: L1 between the sorted node degrees. The teacher's
    nodes are its rank slots; the student's its logits at the teacher's ids in that order, or
    (own_top) its own sorted top logits."""
    t_vals, t_ids = z.topk(top, dim=-1)  # descending
    s_vals = s.topk(top, dim=-1).values if own_top else s.gather(1, t_ids)
    g_s, g_t = graph(s_vals), graph(t_vals)
    f_s = g_s.sum(1).sort(descending=True).values
    f_t = g_t.sum(1).sort(descending=True).values
    return (f_s - f_t).abs().sum() / top**2, g_s, g_t


def _data(n=6, v=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 1
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.randint(0, v, (n,), generator=g)
    return s, z, y


@pytest.mark.parametrize("top,k", [(1, 1), (3, 3), (3, 9), (8, 15)])
@pytest.mark.parametrize("own_top", [False, True])
def test_matches_dense_graph_reference(top, k, own_top):
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=k)
    expected, _, _ = reference(s, z, top, own_top=own_top)
    stats: dict[str, torch.Tensor] = {}
    got = gld(DenseStudent(s), teacher, top=top, ce=0.0, own_top=own_top, stats=stats)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["gld/graph"], expected, rtol=1e-5, atol=1e-6)
    assert "gld/ce" not in stats
    assert ("gld/top_overlap" in stats) == own_top


@pytest.mark.parametrize("weight,ce", [(1.0, 1.0), (0.1, 0.5), (0.0, 2.0)])
def test_total_is_weighted_graph_term_plus_label_cross_entropy(weight, ce):
    s, z, y = _data(seed=4)
    teacher = teacher_batch_from_logits(z, y, k=8)
    stats: dict[str, torch.Tensor] = {}
    got = gld(DenseStudent(s), teacher, top=5, weight=weight, ce=ce, stats=stats)
    expected_graph, _, _ = reference(s, z, 5)
    label_ce = F.cross_entropy(s, y)
    torch.testing.assert_close(got, weight * expected_graph + ce * label_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["gld/ce"], label_ce, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("own_top", [False, True])
def test_lower_bounds_graph_matching_and_gromov_wasserstein(own_top):
    """The loss (GW~ / top^2) <= the GW objective with L1 ground cost and uniform node weights
    at every coupling; hence top^2 x loss <= ||C_S - P C_T P^T||_1 for every node matching P."""
    s, z, y = _data(seed=1)
    top = 5
    teacher = teacher_batch_from_logits(z, y, k=6)
    got = gld(DenseStudent(s), teacher, top=top, ce=0.0, own_top=own_top).item()
    _, g_s, g_t = reference(s, z, top, own_top=own_top)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        perm = torch.arange(top) if trial == 0 else torch.randperm(top, generator=g)
        assert got * top**2 <= (g_s - g_t[perm][:, perm]).abs().sum().item() + 1e-9
    cost = (g_s[:, None, :, None] - g_t[None, :, None, :]).abs()  # [i, k, j, l]
    for trial in range(6):
        pi = torch.rand(top, top, generator=g, dtype=torch.float64)
        for _ in range(200):  # Sinkhorn to uniform marginals 1 / top
            pi = pi / pi.sum(1, keepdim=True) / top
            pi = pi / pi.sum(0, keepdim=True) / top
        if trial == 0:
            pi = torch.full((top, top), 1.0 / top**2, dtype=torch.float64)
        gw = torch.einsum("ikjl,ik,jl->", cost, pi, pi).item()
        assert got <= gw + 1e-12


@pytest.mark.parametrize("own_top", [False, True])
def test_zero_at_the_teachers_raw_logits_and_not_shift_invariant(own_top):
    _, z, y = _data(seed=2)
    teacher = teacher_batch_from_logits(z, y, k=6)
    kw = dict(top=6, ce=0.0, own_top=own_top)
    assert gld(DenseStudent(z), teacher, **kw).item() < 1e-5  # the cache stores fp32
    assert gld(DenseStudent(z + 5.0), teacher, **kw).item() > 1e-3  # raw levels count


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), top=st.integers(1, 6))
def test_on_its_own_top_the_graph_term_cannot_tell_tokens_apart(seed, top):
    """Relabelling the student's vocabulary leaves the figure's form (own top-k, sorted)
    unchanged; read at the teacher's ids, or with the CE term, the loss sees the change."""
    s, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=6)
    moved = DenseStudent(s[:, torch.roll(torch.arange(s.shape[1]), 1)])  # every logit moves
    torch.testing.assert_close(
        gld(DenseStudent(s), teacher, top=top, ce=0.0, own_top=True),
        gld(moved, teacher, top=top, ce=0.0, own_top=True),
        rtol=1e-9,
        atol=1e-9,
    )
    for kw in (dict(ce=0.0), dict(own_top=True)):
        assert not torch.isclose(
            gld(DenseStudent(s), teacher, top=top, **kw), gld(moved, teacher, top=top, **kw)
        )


def _student_top1_agreement(*, seed: int = 0, **options) -> tuple[float, float]:
    """Train a linear student on fixed features with gld against a fixed linear teacher whose
    samples are the labels; return its top-1 agreement with the teacher before and after."""
    g = torch.Generator().manual_seed(seed)
    n, v, d = 256, 32, 12
    feats = torch.randn(n, d, generator=g)
    teacher_logits = feats @ torch.randn(d, v, generator=g) * 1.5 + 2.0  # raw, not centred
    labels = torch.multinomial(torch.softmax(teacher_logits, -1), 1, generator=g).squeeze(-1)
    teacher = teacher_batch_from_logits(teacher_logits, labels, k=8)
    weight = (torch.randn(v, d, generator=g) * 0.1).requires_grad_()
    optimizer = torch.optim.Adam([weight], lr=0.05)

    def agreement() -> float:
        with torch.no_grad():
            return (feats @ weight.T).argmax(-1).eq(teacher_logits.argmax(-1)).float().mean().item()

    before = agreement()
    for _ in range(150):
        loss = gld(ChunkedStudent(feats, weight, vocab_chunk=8), teacher, **options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, agreement()


def test_training_with_the_registered_defaults_moves_top1_to_the_teachers():
    before, after = _student_top1_agreement()
    assert before < 0.1  # chance is 1/32
    assert after > 0.5


def test_the_graph_term_alone_teaches_only_through_the_teachers_ids():
    _, own = _student_top1_agreement(ce=0.0, own_top=True)
    _, at_teacher_ids = _student_top1_agreement(ce=0.0)
    assert own < 0.1  # sorted degrees of its own top-k: any k tokens will do
    assert at_teacher_ids > 0.15  # the raw levels to match sit on the teacher's top tokens


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
    for own_top in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, own_top=own_top: gld(DenseStudent(x), teacher, top=3, own_top=own_top),
            (s.clone().requires_grad_(),),
        )


def test_dense_and_chunked_students_agree():
    g = torch.Generator().manual_seed(6)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    z = torch.randn(n, v, generator=g) * 2
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=6)
    for own_top in (False, True):
        stats: dict[str, torch.Tensor] = {}
        dense = gld(DenseStudent(h @ w.T), teacher, top=4, own_top=own_top, stats=stats)
        dense_grads = torch.autograd.grad(dense, (h, w))
        chunked_student = ChunkedStudent(h, w, vocab_chunk=5, row_chunk=3)
        chunked = gld(chunked_student, teacher, top=4, own_top=own_top)
        chunked_grads = torch.autograd.grad(chunked, (h, w))
        torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
        for a, b in zip(dense_grads, chunked_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert 0.0 <= stats["gld/top_overlap"].item() <= 1.0


def test_bad_top_names_the_fix():
    s, z, y = _data()
    with pytest.raises(ValueError, match="top-k"):
        gld(DenseStudent(s), teacher_batch_from_logits(z, y, k=4), top=8)


def test_spec_lists_the_options_and_declares_its_ce():
    spec = SPECS["gld"]
    assert spec.options == {"top": 8, "weight": 1.0, "ce": 1.0, "own_top": False}
    assert spec.builtin_ce({}) == 1.0 and spec.builtin_ce({"ce": 0.0}) == 0.0
    assert "ce=0" in spec.summary and "--ce-weight" in spec.summary and "sorted" in spec.summary
