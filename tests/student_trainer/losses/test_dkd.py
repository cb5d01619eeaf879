"""DKD and NKD against dense references written from the official (mdistiller, cls_KD) forms."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.dkd import SPECS, dkd, nkd


def dense_parts(s, z, y, T):
    """(TCKD, NCKD, KL) per row at T, from full logits, mdistiller-style masking."""
    gt = torch.zeros_like(z, dtype=torch.bool).scatter(1, y[:, None], True)
    p, q = torch.softmax(z / T, -1), torch.softmax(s / T, -1)
    b_p = torch.stack([p[gt], p[~gt].view(len(y), -1).sum(-1)], -1)
    b_q = torch.stack([q[gt], q[~gt].view(len(y), -1).sum(-1)], -1)
    tckd = (b_p * (b_p.log() - b_q.log())).sum(-1)
    pt = torch.softmax(z / T - 1000.0 * gt, -1)
    lqt = torch.log_softmax(s / T - 1000.0 * gt, -1)
    nckd = (torch.special.xlogy(pt, pt) - pt * lqt).sum(-1)  # 0 log 0 = 0 at the label
    kl = (p * (p.log() - q.log())).sum(-1)
    return tckd, nckd, kl


def bucketed_slots(s, z, y, ids, T):
    """Per row, the non-target distributions of teacher and student at T over the slots
    [ids other than y, one bucket for every id outside ids + {y}], built from explicit lists."""
    rows = []
    for n in range(len(y)):
        label = y[n].item()
        cached = [c for c in ids[n].tolist() if c != label]
        outside = [c for c in range(z.shape[1]) if c != label and c not in cached]
        pt = torch.softmax(torch.cat([z[n, :label], z[n, label + 1 :]]) / T, 0)
        qt = torch.softmax(torch.cat([s[n, :label], s[n, label + 1 :]]) / T, 0)

        def at(dist, cls, label=label):
            return dist[cls - (cls > label)]

        p_slots = torch.stack([at(pt, c) for c in cached] + [sum(at(pt, c) for c in outside)])
        q_slots = torch.stack([at(qt, c) for c in cached] + [sum(at(qt, c) for c in outside)])
        rows.append((p_slots, q_slots))
    return rows


def bucketed_nckd(s, z, y, ids, T):
    return torch.stack(
        [(p * (p.log() - q.log())).sum() for p, q in bucketed_slots(s, z, y, ids, T)]
    )


def bucketed_cross_entropy(s, z, y, ids, T):
    return torch.stack([-(p * q.log()).sum() for p, q in bucketed_slots(s, z, y, ids, T)])


def _data(n=6, v=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s, z, y


def _row(teacher, s, i):
    return DenseStudent(s[i : i + 1]), teacher.select(torch.tensor([i]))


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_identity_on_dense_inputs(T):
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1], temperatures=(T,))
    _, _, kl = dense_parts(s, z, y, T)
    for i in range(len(y)):
        stats: dict[str, torch.Tensor] = {}
        dkd(*_row(teacher, s, i), temperature=T, stats=stats)
        p_y = torch.softmax(z[i] / T, -1)[y[i]]
        torch.testing.assert_close(
            stats["dkd/tckd"] + (1 - p_y) * stats["dkd/nckd"], kl[i], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (1.0, 0.5), (0.3, 0.0)])
def test_full_cache_equals_dense_dkd(T, alpha, beta):
    s, z, y = _data(seed=1)
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1], temperatures=(T,))
    tckd, nckd, _ = dense_parts(s, z, y, T)
    got = dkd(DenseStudent(s), teacher, temperature=T, alpha=alpha, beta=beta, ce=0.0)
    torch.testing.assert_close(
        got, (T**2 * (alpha * tckd + beta * nckd)).mean(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_small_cache_tckd_exact_and_nckd_bucketed(T):
    s, z, y = _data(n=10, v=20, seed=2)
    teacher = teacher_batch_from_logits(z, y, k=5, temperatures=(T,))
    inside = (teacher.ids == y[:, None]).any(-1)
    assert inside.any() and (~inside).any()
    tckd, nckd, _ = dense_parts(s, z, y, T)
    bucket = bucketed_nckd(s, z, y, teacher.ids, T)
    assert (bucket <= nckd + 1e-9).all()  # data processing: the bucket is a lower bound
    for i in range(len(y)):
        stats: dict[str, torch.Tensor] = {}
        dkd(*_row(teacher, s, i), temperature=T, stats=stats)
        torch.testing.assert_close(stats["dkd/tckd"], tckd[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["dkd/nckd"], bucket[i], rtol=1e-5, atol=1e-6)
        assert stats["dkd/teacher_approx_rows"].item() == 0.0


def test_unstored_temperature_falls_back_and_is_flagged():
    s, z, y = _data(seed=3)
    stats: dict[str, torch.Tensor] = {}
    full = teacher_batch_from_logits(z, y, k=z.shape[1])
    exact = dkd(
        DenseStudent(s),
        teacher_batch_from_logits(z, y, k=z.shape[1], temperatures=(4.0,)),
        temperature=4.0,
    )
    # With k = V there is no tail, so the fallback is exact.
    torch.testing.assert_close(
        dkd(DenseStudent(s), full, temperature=4.0, stats=stats), exact, rtol=1e-5, atol=1e-6
    )
    assert stats["dkd/teacher_approx_rows"].item() == 0.0
    for fn, key in ((dkd, "dkd/teacher_approx_rows"), (nkd, "nkd/teacher_approx_rows")):
        small = fn(
            DenseStudent(s), teacher_batch_from_logits(z, y, k=6), temperature=4.0, stats=stats
        )
        assert torch.isfinite(small)
        assert stats[key].item() == 1.0


def test_dkd_zero_when_student_is_teacher_plus_constant():
    _, z, y = _data(seed=4)
    for k in (16, 5):
        teacher = teacher_batch_from_logits(z, y, k=k)
        x = (z + 3.0).clone().requires_grad_()
        got = dkd(DenseStudent(x), teacher, beta=8.0, ce=0.0)
        (grad,) = torch.autograd.grad(got, x)
        assert abs(got.item()) < 1e-6 and grad.abs().max().item() < 1e-6


def nkd_dense(s, z, y, T, gamma):
    """yzd-v/cls_KD NKDLoss, restated."""
    n, v = s.shape
    log_q = torch.log_softmax(s, -1)
    p = torch.softmax(z, -1)
    target = -(p.gather(1, y[:, None]) * log_q.gather(1, y[:, None])).mean()
    keep = torch.ones_like(s, dtype=torch.bool).scatter(1, y[:, None], False)
    s_nt, z_nt = s[keep].view(n, v - 1), z[keep].view(n, v - 1)
    non = (torch.softmax(z_nt / T, -1) * torch.log_softmax(s_nt / T, -1)).sum(-1).mean()
    return target - gamma * T**2 * non


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("gamma", [1.5, 0.25])
def test_full_cache_equals_dense_nkd(T, gamma):
    s, z, y = _data(seed=5)
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1], temperatures=(T,))
    got = nkd(DenseStudent(s), teacher, temperature=T, gamma=gamma, ce=0.0)
    torch.testing.assert_close(got, nkd_dense(s, z, y, T, gamma), rtol=1e-5, atol=1e-6)


def test_nkd_small_cache_non_target_is_the_bucketed_cross_entropy():
    s, z, y = _data(n=8, v=20, seed=6)
    teacher = teacher_batch_from_logits(z, y, k=5)
    inside = (teacher.ids == y[:, None]).any(-1)
    assert inside.any() and (~inside).any()
    for gamma in (1.5, 0.25):
        stats: dict[str, torch.Tensor] = {}
        got = nkd(DenseStudent(s), teacher, gamma=gamma, ce=0.0, stats=stats)
        log_q = torch.log_softmax(s, -1)
        p = torch.softmax(z, -1)
        target = -(p.gather(1, y[:, None]) * log_q.gather(1, y[:, None])).squeeze(1)
        ce = bucketed_cross_entropy(s, z, y, teacher.ids, 1.0)
        torch.testing.assert_close(stats["nkd/non_target"], ce.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, (target + gamma * ce).mean(), rtol=1e-5, atol=1e-6)
    # The bucketed cross-entropy is a lower bound on the full non-target cross-entropy.
    keep = torch.ones_like(s, dtype=torch.bool).scatter(1, y[:, None], False)
    full_ce = -(
        torch.softmax(z[keep].view(8, 19), -1) * torch.log_softmax(s[keep].view(8, 19), -1)
    ).sum(-1)
    assert (ce <= full_ce + 1e-9).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 3.0))
def test_nkd_non_target_minimised_when_student_matches_teacher(seed, scale):
    _, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=6)
    best: dict[str, torch.Tensor] = {}
    matched = z.clone()
    matched[torch.arange(len(y)), y] = 10.0  # the target logit is free
    nkd(DenseStudent(matched), teacher, stats=best)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    other: dict[str, torch.Tensor] = {}
    nkd(DenseStudent(matched + scale * noise), teacher, stats=other)
    assert other["nkd/non_target"].item() >= best["nkd/non_target"].item() - 1e-6


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-30, 30), k=st.integers(1, 16))
def test_invariant_to_shifting_the_student(seed, shift, k):
    s, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=k)
    for fn in (dkd, nkd):
        torch.testing.assert_close(
            fn(DenseStudent(s), teacher), fn(DenseStudent(s + shift), teacher), rtol=1e-6, atol=1e-6
        )


def _teacher64(z, y, k, temperatures=()):
    t = teacher_batch_from_logits(z, y, k=k, temperatures=temperatures)
    return replace(
        t,
        logprobs=t.logprobs.double(),
        lse=t.lse.double(),
        log_tail=t.log_tail.double(),
        label_logprob=t.label_logprob.double(),
        temp_lse=None if t.temp_lse is None else t.temp_lse.double(),
    )


@pytest.mark.parametrize("k", [4, 9])
def test_gradcheck_float64(k):
    s, z, y = _data(n=4, v=9, seed=7)
    y[0] = z[0].argmax()
    for T in (1.0, 2.0):
        teacher = _teacher64(z, y, k, temperatures=(2.0,))
        for fn in (dkd, nkd):
            assert torch.autograd.gradcheck(
                lambda x, fn=fn, T=T, teacher=teacher: fn(DenseStudent(x), teacher, temperature=T),
                (s.clone().requires_grad_(),),
            )


def test_dense_and_chunked_students_agree():
    g = torch.Generator().manual_seed(8)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    z = torch.randn(n, v, generator=g) * 2
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=6)
    for fn in (dkd, nkd):
        dense = fn(DenseStudent(h @ w.T), teacher, temperature=2.0)
        dense_grads = torch.autograd.grad(dense, (h, w))
        chunked = fn(ChunkedStudent(h, w, vocab_chunk=5, row_chunk=3), teacher, temperature=2.0)
        chunked_grads = torch.autograd.grad(chunked, (h, w))
        torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
        for a, b in zip(dense_grads, chunked_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fn", [dkd, nkd], ids=["dkd", "nkd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_the_papers_label_cross_entropy_is_added_at_t1_by_default(fn, T):
    """Both papers train on CE + their term (mdistiller DKD, cls_KD's distiller): the default
    adds the label CE at T = 1 with weight 1, `ce` scales it and `ce=0` removes it."""
    s, z, y = _data(seed=9)
    teacher = teacher_batch_from_logits(z, y, k=5, temperatures=(2.0,))
    name = fn.__name__
    bare = fn(DenseStudent(s), teacher, temperature=T, ce=0.0)
    stats: dict[str, torch.Tensor] = {}
    default = fn(DenseStudent(s), teacher, temperature=T, stats=stats)
    label_ce = F.cross_entropy(s, y)  # at T = 1 whatever the distillation T
    torch.testing.assert_close(default, bare + label_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[f"{name}/ce"], label_ce, rtol=1e-6, atol=1e-7)
    half = fn(DenseStudent(s), teacher, temperature=T, ce=0.5)
    torch.testing.assert_close(half, bare + 0.5 * label_ce, rtol=1e-6, atol=1e-6)
    assert SPECS[name].builtin_ce({}) == 1.0 and SPECS[name].builtin_ce({"ce": 0.0}) == 0.0


def test_specs_list_the_options():
    assert SPECS["dkd"].options == {
        "temperature": 1.0, "alpha": 1.0, "beta": 0.5, "ce": 1.0, "warmup_epochs": 0.0
    }  # fmt: skip
    assert SPECS["nkd"].options == {"temperature": 1.0, "gamma": 1.5, "ce": 1.0}
    assert all("ce=0" in spec.summary and "--ce-weight" in spec.summary for spec in SPECS.values())
    assert isinstance(SPECS["dkd"].fn(DenseStudent(torch.zeros(1, 3)), _tiny()), torch.Tensor)


def _tiny() -> TeacherBatch:
    return teacher_batch_from_logits(torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([1]), k=2)
