"""ChunkedStudent against DenseStudent: values and gradients of lse, gather, topk_ids, scaled.

Both implementations compute in float32 whatever the input dtype, so gradcheck runs on float64
inputs with a finite-difference step sized for float32 outputs; the exact gradient checks
compare against float64 autograd of the dense logits instead. `DenseStudent` is the float64
test double the loss tests gradcheck through.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from student_trainer.losses._student import ChunkedStudent, DenseStudent, StudentLogits


def _head(n: int, v: int, d: int, *, bias: bool, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    return h, w, b


def _dense_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    z = h @ w.T
    return z if b is None else z + b


def _params(h: Tensor, w: Tensor, b: Tensor | None) -> list[Tensor]:
    return [t for t in (h, w, b) if t is not None]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_lse_and_gather_match_dense(bias: bool, temperature: float) -> None:
    n, v, d, k = 9, 23, 5, 4
    h, w, b = _head(n, v, d, bias=bias, seed=1)
    ids = torch.randint(0, v, (n, k), generator=torch.Generator().manual_seed(2))
    params = _params(h, w, b)
    c_lse, c_gather = torch.randn(n), torch.randn(n, k)

    def run(student: StudentLogits) -> tuple[Tensor, ...]:
        lse, gathered, logprobs = student.lse(), student.gather(ids), student.logprobs_at(ids)
        out = (lse * c_lse).sum() + (gathered * c_gather).sum()
        return (lse, gathered, logprobs, *torch.autograd.grad(out, params))

    chunked = ChunkedStudent(h, w, b, vocab_chunk=5, row_chunk=4).scaled(temperature)
    dense = DenseStudent(_dense_logits(h, w, b)).scaled(temperature)
    for got, want in zip(run(chunked), run(dense), strict=True):
        torch.testing.assert_close(got, want)


def test_lse_is_cached_and_full_matches() -> None:
    h, w, b = _head(4, 10, 3, bias=True, seed=3)
    chunked = ChunkedStudent(h, w, b, vocab_chunk=3)
    assert chunked.lse() is chunked.lse()
    torch.testing.assert_close(chunked.full(), _dense_logits(h, w, b))


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_float64_autograd(bias: bool) -> None:
    """The custom chunked backward against float64 autograd of the dense logits."""
    n, v, d, k = 6, 17, 4, 3
    h, w, b = _head(n, v, d, bias=bias, seed=4, dtype=torch.float64)
    ids = torch.randint(0, v, (n, k), generator=torch.Generator().manual_seed(5))
    params = _params(h, w, b)
    c_lse, c_gather = torch.randn(n, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    student = ChunkedStudent(h, w, b, vocab_chunk=4, row_chunk=4)
    out = (student.lse().double() * c_lse).sum() + (student.gather(ids).double() * c_gather).sum()
    logits = _dense_logits(h, w, b)
    ref = (torch.logsumexp(logits, -1) * c_lse).sum() + (logits.gather(-1, ids) * c_gather).sum()
    for got, want in zip(
        torch.autograd.grad(out, params), torch.autograd.grad(ref, params), strict=True
    ):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("what", ["lse", "gather", "scaled_lse"])
def test_gradcheck_chunked(what: str) -> None:
    """gradcheck on float64 inputs; eps and tolerances sized for the float32 outputs."""
    n, v, d = 4, 11, 3
    h, w, b = _head(n, v, d, bias=True, seed=6, dtype=torch.float64)
    ids = torch.randint(0, v, (n, 3), generator=torch.Generator().manual_seed(7))

    def fn(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        student = ChunkedStudent(h, w, b, vocab_chunk=4, row_chunk=3)
        if what == "lse":
            return student.lse()
        if what == "gather":
            return student.gather(ids)
        return student.scaled(1.7).lse()

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_dense_student_keeps_float64_and_widens_half_precision() -> None:
    """float64 stays float64 (so a tight gradcheck passes); bf16 logits come out float32."""
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3], [6, 1], [2, 2]])

    def fn(s: Tensor) -> Tensor:
        student = DenseStudent(s).scaled(1.3)
        return student.logprobs_at(ids)

    assert torch.autograd.gradcheck(fn, (logits,))
    assert DenseStudent(logits).lse().dtype == torch.float64
    half = DenseStudent(logits.detach().bfloat16())
    assert half.lse().dtype == half.gather(ids).dtype == half.full().dtype == torch.float32
    h = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(7, 4, dtype=torch.float64)
    chunked = ChunkedStudent(h, w, vocab_chunk=3)
    assert chunked.lse().dtype == chunked.gather(ids).dtype == torch.float64
    torch.testing.assert_close(chunked.lse(), torch.logsumexp(h @ w.T, -1), rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(2, 30),
    k=st.integers(1, 8),
    chunk=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_topk_ids_match_dense(n: int, v: int, k: int, chunk: int, seed: int) -> None:
    k = min(k, v)
    h, w, b = _head(n, v, 4, bias=True, seed=seed)
    chunked = ChunkedStudent(h, w, b, vocab_chunk=chunk)
    dense = DenseStudent(_dense_logits(h, w, b).detach())
    got, want = chunked.topk_ids(k), dense.topk_ids(k)
    assert got.shape == (n, k)
    # Same ids in the same (descending) order; compare values too in case of near-ties.
    logits = dense.full()
    torch.testing.assert_close(logits.gather(1, got), logits.gather(1, want))
    assert torch.equal(got.sort(1).values, want.sort(1).values)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 7),
    v=st.integers(1, 25),
    vocab_chunk=st.integers(1, 10),
    row_chunk=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_chunk_sizes_do_not_change_values(
    n: int, v: int, vocab_chunk: int, row_chunk: int, seed: int
) -> None:
    h, w, b = _head(n, v, 3, bias=False, seed=seed)
    ids = torch.randint(0, v, (n, 3), generator=torch.Generator().manual_seed(seed))
    chunked = ChunkedStudent(h, w, b, vocab_chunk=vocab_chunk, row_chunk=row_chunk)
    dense = DenseStudent(_dense_logits(h, w, b))
    torch.testing.assert_close(chunked.lse(), dense.lse())
    torch.testing.assert_close(chunked.gather(ids), dense.gather(ids))
