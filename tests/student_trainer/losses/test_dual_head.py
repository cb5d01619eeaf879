"""Dual-head KD against the DHKD BinaryKLNorm form, and the head separation it relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.dual_head import SPECS, dual_head


def binary_kl_norm(student, teacher, tau, eps=1e-8):
    """penghui-yang/DHKD BinaryKLNorm.forward, restated (KLDivLoss against a 0.5 target)."""
    sig = torch.sigmoid((student - teacher) / tau).clamp(eps, 1 - eps)
    half = torch.full_like(sig, 0.5)
    loss = F.kl_div(sig.log(), half, reduction="none") + F.kl_div(
        (1 - sig).log(), half, reduction="none"
    )
    return tau**2 * loss.sum() / student.shape[0]


def _data(n=5, v=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    s0 = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    s1 = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s0, s1, z, y


@pytest.mark.parametrize("tau,alpha_v,gamma", [(2.0, 100.0, 1.0), (1.0, 1.2, 0.5), (4.0, 24, 0.0)])
def test_full_cache_equals_dhkd_reference(tau, alpha_v, gamma):
    s0, s1, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1])
    stats: dict[str, torch.Tensor] = {}
    got = dual_head(
        DenseStudent(s0),
        teacher,
        aux_student=DenseStudent(s1),
        temperature=tau,
        alpha_v=alpha_v,
        gamma=gamma,
        stats=stats,
    )
    ce = F.cross_entropy(s0, y)
    kd = binary_kl_norm(s1, z, tau)
    alpha = alpha_v / z.shape[1]  # DHKD's alpha for this many classes
    torch.testing.assert_close(got, gamma * ce + alpha * kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["dual-head/kd"], kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["dual-head/ce"], ce, rtol=1e-6, atol=1e-7)


def test_restricted_to_cached_ids():
    s0, s1, z, y = _data(seed=1, v=20)
    teacher = teacher_batch_from_logits(z, y, k=6)
    got = dual_head(DenseStudent(s0), teacher, aux_student=DenseStudent(s1), gamma=0.0)
    expected = binary_kl_norm(s1.gather(1, teacher.ids), z.gather(1, teacher.ids), 2.0)
    torch.testing.assert_close(got, 100.0 / 20 * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "classes,paper_alpha", [(100, 1.0), (1000, 0.1)], ids=["cifar", "imagenet"]
)
def test_defaults_reproduce_both_published_dhkd_settings(classes, paper_alpha):
    """DHKD ran CE + alpha * BinaryKLNorm (tau 2, summed over classes) with alpha = 1 on
    CIFAR-100 and 0.1 on ImageNet: alpha x classes = 100 both times, which `alpha_v` keeps."""
    g = torch.Generator().manual_seed(5)
    s0, s1, z = (torch.randn(3, classes, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    y = torch.randint(0, classes, (3,), generator=g)
    teacher = teacher_batch_from_logits(z, y, k=classes)
    got = dual_head(DenseStudent(s0), teacher, aux_student=DenseStudent(s1))
    expected = F.cross_entropy(s0, y) + paper_alpha * binary_kl_norm(s1, z, 2.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kd_does_not_drown_the_ce_at_init_on_an_llm_sized_vocabulary():
    """V = 8192, k = 64, teacher raw logits shaped like the bench cache's (top-64 mean ~4, top-1
    ~8, lse ~10) and a fresh student (logits ~ N(0, 0.23^2)): the KD term starts below the CE.
    Weighting every cached class by 1 (alpha_v = V) instead made it ~13x the CE on the bench."""
    g = torch.Generator().manual_seed(0)
    n, v = 64, 8192
    z = torch.randn(n, v, generator=g) * 1.3
    peaks = torch.rand(n, 24, generator=g) * 6 + 1
    z = z.scatter_add(1, torch.randint(0, v, (n, 24), generator=g), peaks)
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=64)
    main, aux = (DenseStudent(torch.randn(n, v, generator=g) * 0.23) for _ in range(2))
    stats: dict[str, torch.Tensor] = {}
    dual_head(main, teacher, aux_student=aux, stats=stats)
    ce, kd = stats["dual-head/ce"].item(), stats["dual-head/kd"].item()
    weighted = SPECS["dual-head"].options["alpha_v"] / v * kd
    assert 0.05 * ce < weighted < ce
    assert kd > 10 * ce  # the same sum weighted 1 per class: the old default


def test_main_head_gets_no_kd_gradient_and_aux_head_no_ce_gradient():
    g = torch.Generator().manual_seed(2)
    n, d, v = 6, 4, 15
    hidden = torch.randn(n, d, generator=g, requires_grad=True)  # the shared backbone output
    w_main = torch.randn(v, d, generator=g, requires_grad=True)
    w_aux = torch.randn(v, d, generator=g, requires_grad=True)
    teacher = teacher_batch_from_logits(
        torch.randn(n, v, generator=g) * 3, torch.randint(0, v, (n,), generator=g), k=5
    )

    def grads(alpha_v, gamma):
        loss = dual_head(
            DenseStudent(hidden @ w_main.T),
            teacher,
            aux_student=DenseStudent(hidden @ w_aux.T),
            alpha_v=alpha_v,
            gamma=gamma,
        )
        return torch.autograd.grad(loss, (hidden, w_main, w_aux))

    kd_only, ce_only, both = grads(100.0, 0.0), grads(0.0, 1.0), grads(100.0, 1.0)
    assert kd_only[1].abs().max().item() == 0.0  # no KD gradient reaches the main head
    assert ce_only[2].abs().max().item() == 0.0  # no CE gradient reaches the aux head
    assert kd_only[2].abs().max().item() > 0.0 and ce_only[1].abs().max().item() > 0.0
    torch.testing.assert_close(both[1], ce_only[1])
    torch.testing.assert_close(both[2], kd_only[2])
    torch.testing.assert_close(both[0], kd_only[0] + ce_only[0])  # the backbone gets both


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.5, 4.0))
def test_kd_is_zero_only_at_the_teachers_raw_logits(seed, tau):
    s0, s1, z, y = _data(seed=seed)
    teacher = teacher_batch_from_logits(z, y, k=7)
    aux = s1.clone()
    aux.scatter_(1, teacher.ids, teacher.logits.double())
    stats: dict[str, torch.Tensor] = {}
    dual_head(
        DenseStudent(s0), teacher, aux_student=DenseStudent(aux), temperature=tau, stats=stats
    )
    assert abs(stats["dual-head/kd"].item()) < 1e-10
    dual_head(
        DenseStudent(s0), teacher, aux_student=DenseStudent(aux + 1.0), temperature=tau, stats=stats
    )
    assert stats["dual-head/kd"].item() > 1e-4  # not shift-invariant: raw logits must match


def test_gradcheck_float64():
    s0, s1, z, y = _data(n=3, v=7, seed=3)
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(4, -1)
    teacher = TeacherBatch(
        ids=top_ids,
        logprobs=top_lp,
        lse=torch.logsumexp(z, -1),
        log_tail=torch.log1p(-top_lp.exp().sum(-1)),
        labels=y,
        label_logprob=lp.gather(1, y[:, None]).squeeze(1),
        vocab_size=7,
    )
    assert torch.autograd.gradcheck(
        lambda a, b: dual_head(DenseStudent(a), teacher, aux_student=DenseStudent(b)),
        (s0.clone().requires_grad_(), s1.clone().requires_grad_()),
    )


def test_dense_and_chunked_students_agree():
    g = torch.Generator().manual_seed(6)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w0 = torch.randn(v, d, generator=g, requires_grad=True)
    w1 = torch.randn(v, d, generator=g, requires_grad=True)
    teacher = teacher_batch_from_logits(
        torch.randn(n, v, generator=g) * 2, torch.randint(0, v, (n,), generator=g), k=6
    )
    dense = dual_head(DenseStudent(h @ w0.T), teacher, aux_student=DenseStudent(h @ w1.T))
    dense_grads = torch.autograd.grad(dense, (h, w0, w1))
    chunked = dual_head(
        ChunkedStudent(h, w0, vocab_chunk=5, row_chunk=3),
        teacher,
        aux_student=ChunkedStudent(h, w1, vocab_chunk=4, row_chunk=2),
    )
    chunked_grads = torch.autograd.grad(chunked, (h, w0, w1))
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
    for a, b in zip(dense_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_spec_declares_the_aux_head_and_its_ce():
    spec = SPECS["dual-head"]
    assert spec.aux_head
    assert spec.options == {
        "temperature": 2.0, "alpha_v": 100.0, "gamma": 1.0, "kd_until_epoch": 0.0
    }  # fmt: skip
    assert spec.builtin_ce({}) == 1.0 and spec.builtin_ce({"gamma": 0.0}) == 0.0
    assert "--ce-weight" in spec.summary
