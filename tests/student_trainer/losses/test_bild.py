"""BiLD against an independent dense reference written from the paper's description."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.losses.bild import SPECS, bild


def _pairs_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per row: KL between softmaxes of all i<j differences, written with explicit loops."""
    n, j = t.shape
    out = []
    for row in range(n):
        dt = torch.stack([t[row, a] - t[row, b] for a in range(j) for b in range(a + 1, j)])
        ds = torch.stack([s[row, a] - s[row, b] for a in range(j) for b in range(a + 1, j)])
        p = torch.softmax(dt, 0)
        out.append((p * (torch.log(p) - torch.log_softmax(ds, 0))).sum())
    return torch.stack(out)


def reference(s: torch.Tensor, z: torch.Tensor, top: int, temperature: float) -> torch.Tensor:
    """BiLD from dense student logits `s` and dense teacher logits `z` (both (N, V))."""
    t_ids = z.topk(top, dim=-1).indices
    s_ids = s.topk(top, dim=-1).indices
    t_ld = _pairs_kl(z.gather(1, t_ids) / temperature, s.gather(1, t_ids) / temperature)
    s_ld = _pairs_kl(z.gather(1, s_ids) / temperature, s.gather(1, s_ids) / temperature)
    return t_ld, s_ld


def _data(n=5, v=20, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=dtype) * 2
    s = torch.randn(n, v, generator=g, dtype=dtype) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s, z, y


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("top", [2, 4, 8])
def test_full_cache_matches_dense_reference(top, temperature):
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1])
    stats: dict[str, torch.Tensor] = {}
    got = bild(DenseStudent(s), teacher, temperature=temperature, top=top, stats=stats)
    t_ld, s_ld = reference(s, z, top, temperature)
    torch.testing.assert_close(got, (t_ld + s_ld).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["bild/t_ld"], t_ld.mean(), rtol=1e-5, atol=1e-6)
    assert stats["bild/sld_imputed"].item() == 0.0


def test_student_top_inside_cache_is_exact_with_small_k():
    s, z, y = _data(seed=1)
    s = z + 0.05 * s  # the student's top-4 lies inside the teacher's top-10
    teacher = teacher_batch_from_logits(z, y, k=10)
    stats: dict[str, torch.Tensor] = {}
    got = bild(DenseStudent(s), teacher, top=4, stats=stats)
    assert stats["bild/sld_imputed"].item() == 0.0
    t_ld, s_ld = reference(s, z, 4, 3.0)
    torch.testing.assert_close(got, (t_ld + s_ld).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impute", ["min", "uniform"])
def test_imputation_equals_reference_on_a_filled_teacher(impute):
    s, z, y = _data(seed=2)
    v, k, top = z.shape[1], 6, 4
    teacher = teacher_batch_from_logits(z, y, k=k)
    stats: dict[str, torch.Tensor] = {}
    got = bild(DenseStudent(s), teacher, top=top, impute=impute, stats=stats)
    # Reference: a dense teacher whose values outside the top-k are the imputed value.
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(k, -1)
    if impute == "min":
        fill = top_lp[:, -1:]
    else:
        tail = 1 - top_lp.exp().sum(-1, keepdim=True)
        fill = torch.log(tail / (v - k))
    filled = fill.expand(-1, v).clone().scatter(1, top_ids, top_lp)
    t_ld, s_ld = reference(s, filled, top, 3.0)
    torch.testing.assert_close(got, (t_ld + s_ld).mean(), rtol=1e-5, atol=1e-6)
    s_ids = s.topk(top, -1).indices
    missing = ~(s_ids.unsqueeze(-1) == top_ids.unsqueeze(1)).any(-1)
    assert missing.any(), "the test needs some student ids outside the cache"
    assert stats["bild/sld_imputed"].item() == pytest.approx(missing.double().mean().item())
    assert stats["bild/sld_rows_affected"].item() == pytest.approx(
        missing.any(-1).double().mean().item()
    )


def test_skip_drops_affected_rows_only():
    s, z, y = _data(seed=3)
    teacher = teacher_batch_from_logits(z, y, k=6)
    got = bild(DenseStudent(s), teacher, top=4, impute="skip")
    t_ld, s_ld = reference(s, z, 4, 3.0)
    top_ids = teacher.ids
    missing = ~(s.topk(4, -1).indices.unsqueeze(-1) == top_ids.unsqueeze(1)).any(-1)
    keep = (~missing.any(-1)).double()
    torch.testing.assert_close(got, (t_ld + keep * s_ld).mean(), rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift_s=st.floats(-50, 50),
    shift_z=st.floats(-50, 50),
    impute=st.sampled_from(["min", "uniform", "skip"]),
)
def test_invariant_to_per_row_constants(seed, shift_s, shift_z, impute):
    s, z, y = _data(n=4, v=16, seed=seed)
    shifts = torch.linspace(-1, 1, 4, dtype=s.dtype).unsqueeze(-1)
    base = bild(DenseStudent(s), teacher_batch_from_logits(z, y, k=8), top=4, impute=impute)
    moved = bild(
        DenseStudent(s + shift_s * shifts),
        teacher_batch_from_logits(z + shift_z * shifts, y, k=8),
        top=4,
        impute=impute,
    )
    torch.testing.assert_close(base, moved, rtol=1e-4, atol=1e-6)


def test_zero_when_student_is_teacher_plus_constant():
    s, z, y = _data(seed=4)
    teacher = teacher_batch_from_logits(z, y, k=z.shape[1])
    got = bild(DenseStudent(z + 7.0), teacher, top=8)
    assert got.abs().item() < 1e-6  # the cache stores float32 log-probs
    # t-LD alone vanishes whenever the student matches the teacher on I8 only.
    s[:, :] = 0.0
    s.scatter_(1, teacher.ids[:, :8], teacher.logits[:, :8].double() - 3.0)
    stats: dict[str, torch.Tensor] = {}
    bild(DenseStudent(s), teacher, top=8, stats=stats)
    assert stats["bild/t_ld"].abs().item() < 1e-6


def test_gradcheck_float64():
    s, z, y = _data(n=3, v=10, seed=5)
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(5, -1)
    teacher = TeacherBatch(
        ids=top_ids,
        logprobs=top_lp,
        lse=torch.logsumexp(z, -1),
        log_tail=torch.log1p(-top_lp.exp().sum(-1)),
        labels=y,
        label_logprob=lp.gather(1, y[:, None]).squeeze(1),
        vocab_size=10,
    )
    for impute in ("min", "uniform", "skip"):
        assert torch.autograd.gradcheck(
            lambda x, impute=impute: bild(DenseStudent(x), teacher, top=4, impute=impute),
            (s.clone().requires_grad_(),),
        )


def test_dense_and_chunked_students_agree():
    g = torch.Generator().manual_seed(6)
    n, d, v = 7, 5, 23
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    z = torch.randn(n, v, generator=g) * 2
    teacher = teacher_batch_from_logits(z, torch.randint(0, v, (n,), generator=g), k=6)
    dense = bild(DenseStudent(h @ w.T), teacher, top=4)
    dense_grads = torch.autograd.grad(dense, (h, w))
    chunked = bild(ChunkedStudent(h, w, vocab_chunk=5, row_chunk=3), teacher, top=4)
    chunked_grads = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
    for a, b in zip(dense_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_options_name_the_fix():
    s, z, y = _data()
    teacher = teacher_batch_from_logits(z, y, k=4)
    with pytest.raises(ValueError, match="top-k"):
        bild(DenseStudent(s), teacher, top=8)
    with pytest.raises(ValueError, match="impute"):
        bild(DenseStudent(s), teacher, top=4, impute="zero")


def test_spec_lists_the_options():
    spec = SPECS["bild"]
    assert spec.options == {"temperature": 3.0, "top": 8, "impute": "min"}
    assert "exact" in spec.summary and "\n" not in spec.summary
