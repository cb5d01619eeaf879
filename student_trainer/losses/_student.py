"""The student's side of every loss, with the memory strategy hidden behind one interface.

Losses ask for what they need (`lse()`, `gather(ids)`, rarely `full()` or `topk(j)`) from a
`StudentLogits`; they never decide how it is computed. `DenseStudent` wraps logits the model
already produced. `ChunkedStudent` starts from the final hidden states and the lm_head and walks
the vocabulary in chunks, so the [N, V] logits (and their fp32 copy) never exist for losses that
only need the log-sum-exp and the logits at the cached ids: the Cut Cross-Entropy idea.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _wide(x: Tensor) -> Tensor:
    """`x` in at least float32 (bf16/fp16 are widened; float64 stays float64 for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class StudentLogits(ABC):
    """The student's logits at N positions over a vocabulary of V, computed on demand.

    Every tensor returned is at least float32 (float64 inputs stay float64, for gradcheck) and
    differentiable with respect to the student.
    """

    num_rows: int
    vocab_size: int

    @abstractmethod
    def lse(self) -> Tensor:
        """(N,) log-sum-exp of the student logits over the full vocabulary."""

    @abstractmethod
    def gather(self, ids: Tensor) -> Tensor:
        """(N, j) student logits at `ids` (N, j)."""

    @abstractmethod
    def full(self) -> Tensor:
        """(N, V) all student logits (at least float32): only for losses that need the whole vocabulary."""

    @abstractmethod
    def scaled(self, temperature: float) -> StudentLogits:
        """The same student with logits divided by `temperature` (same memory strategy)."""

    def logprobs_at(self, ids: Tensor) -> Tensor:
        """(N, j) student log-probabilities at `ids`."""
        return self.gather(ids) - self.lse().unsqueeze(-1)

    def topk_ids(self, k: int) -> Tensor:
        """(N, k) ids of the student's k largest logits (no gradient flows through a choice)."""
        with torch.no_grad():
            return self.full().topk(k, dim=-1).indices


class DenseStudent(StudentLogits):
    """Logits the model already materialised, (N, V) in any float dtype."""

    def __init__(self, logits: Tensor) -> None:
        self._logits = logits
        self.num_rows, self.vocab_size = logits.shape
        self._lse: Tensor | None = None

    def lse(self) -> Tensor:
        if self._lse is None:
            self._lse = _LogSumExp.apply(_wide(self._logits))
        return self._lse

    def gather(self, ids: Tensor) -> Tensor:
        return _wide(self._logits.gather(-1, ids))

    def logprobs_at(self, ids: Tensor) -> Tensor:
        return _LogProbsAt.apply(_wide(self._logits), ids)

    def full(self) -> Tensor:
        return _wide(self._logits)

    def scaled(self, temperature: float) -> StudentLogits:
        return self if temperature == 1.0 else DenseStudent(_wide(self._logits) / temperature)


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the last dim whose backward is one fused softmax, not sub, exp and mul
    passes over the [N, V] logits (the pass count is what a step pays for on a large vocabulary)."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        return torch.logsumexp(z, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return torch.softmax(z, dim=-1).mul_(grad.unsqueeze(-1))


class _LogProbsAt(torch.autograd.Function):
    """log_softmax(z) at `ids` with a backward that writes one [N, V] gradient in place: the
    softmax scaled by -sum(g), plus g scattered at `ids` (autograd would add a zero-filled
    scatter to a separate softmax gradient: two more passes and allocations)."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, ids)
        return z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, ids = ctx.saved_tensors
        out = torch.softmax(z, dim=-1).mul_(-grad.sum(-1, keepdim=True))
        return out.scatter_add_(-1, ids, grad), None


class _ChunkedLSE(torch.autograd.Function):
    """log-sum-exp of `h @ W.T + b` over the vocabulary, one vocabulary chunk at a time.

    Forward keeps only a running (N,) result; backward recomputes each chunk's logits, so peak
    memory is O(N * chunk) instead of O(N * V).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, chunk: int) -> Tensor:  # type: ignore[override]
        lse = torch.full((h.shape[0],), -torch.inf, device=h.device, dtype=_wide(h[:0]).dtype)
        for start in range(0, weight.shape[0], chunk):
            z = _chunk_logits(h, weight, bias, start, chunk)  # (N, c) fp32
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        ctx.save_for_backward(h, weight, bias, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):  # type: ignore[override]
        h, weight, bias, lse = ctx.saved_tensors
        chunk = ctx.chunk
        wide = lse.dtype
        grad_h = torch.zeros(h.shape, device=h.device, dtype=wide)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=wide)
        grad_b = None if bias is None else torch.zeros(bias.shape, device=h.device, dtype=wide)
        hf = h.to(wide)
        for start in range(0, weight.shape[0], chunk):
            z = _chunk_logits(h, weight, bias, start, chunk)
            g = torch.exp(z - lse.unsqueeze(-1)) * grad_lse.unsqueeze(
                -1
            )  # (N, c) softmax * dL/dlse
            grad_h += g @ weight[start : start + chunk].to(wide)
            grad_w[start : start + chunk] = g.T @ hf
            if grad_b is not None:
                grad_b[start : start + chunk] = g.sum(0)
        return (
            grad_h.to(h.dtype),
            grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
        )


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, start: int, chunk: int) -> Tensor:
    z = h @ weight[start : start + chunk].T
    if bias is not None:
        z = z + bias[start : start + chunk]
    return _wide(z)


class ChunkedStudent(StudentLogits):
    """Student logits defined by final hidden states (N, d) and an lm_head (V, d) [+ bias (V,)].

    `lse()` and `gather()` never build the [N, V] logits: the lse walks the vocabulary in chunks
    of `vocab_chunk`, and gathers multiply each block of `row_chunk` rows by only the lm_head rows
    that block asks for (recomputed in backward through activation checkpointing).
    """

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        vocab_chunk: int = 8192,
        row_chunk: int = 2048,
    ) -> None:
        self._h, self._w, self._b = hidden, weight, bias
        self.num_rows = hidden.shape[0]
        self.vocab_size = weight.shape[0]
        self._vocab_chunk, self._row_chunk = vocab_chunk, row_chunk
        self._lse: Tensor | None = None

    def lse(self) -> Tensor:
        if self._lse is None:
            self._lse = _ChunkedLSE.apply(self._h, self._w, self._b, self._vocab_chunk)
        return self._lse

    def gather(self, ids: Tensor) -> Tensor:
        blocks = []
        for start in range(0, self.num_rows, self._row_chunk):
            rows = slice(start, start + self._row_chunk)
            blocks.append(
                checkpoint(
                    _gather_block, self._h[rows], self._w, self._b, ids[rows], use_reentrant=False
                )
            )
        return torch.cat(blocks) if blocks else _wide(self._h[:0]).new_zeros(ids.shape)

    def full(self) -> Tensor:
        z = self._h @ self._w.T
        if self._b is not None:
            z = z + self._b
        return _wide(z)

    def with_head(self, weight: Tensor, bias: Tensor | None = None) -> ChunkedStudent:
        """The same hidden states through another lm_head (a dual-head student's aux head)."""
        return ChunkedStudent(
            self._h, weight, bias, vocab_chunk=self._vocab_chunk, row_chunk=self._row_chunk
        )

    def scaled(self, temperature: float) -> StudentLogits:
        if temperature == 1.0:
            return self
        # Logits are affine in (h, b): (h W^T + b) / T = (h / T) W^T + b / T.
        bias = None if self._b is None else self._b / temperature
        return ChunkedStudent(
            self._h / temperature,
            self._w,
            bias,
            vocab_chunk=self._vocab_chunk,
            row_chunk=self._row_chunk,
        )

    def topk_ids(self, k: int) -> Tensor:
        """Top-k ids chunk by chunk over the vocabulary: a running merge, no [N, V] tensor."""
        with torch.no_grad():
            best_v = torch.full(
                (self.num_rows, 0),
                -torch.inf,
                device=self._h.device,
                dtype=_wide(self._h[:0]).dtype,
            )
            best_i = torch.zeros((self.num_rows, 0), dtype=torch.long, device=self._h.device)
            for start in range(0, self.vocab_size, self._vocab_chunk):
                z = _chunk_logits(self._h, self._w, self._b, start, self._vocab_chunk)
                v, i = z.topk(min(k, z.shape[1]), dim=-1)
                best_v, pick = torch.cat([best_v, v], 1).topk(
                    min(k, best_v.shape[1] + v.shape[1]), dim=-1
                )
                best_i = torch.cat([best_i, i + start], 1).gather(1, pick)
            return best_i


def _gather_block(h: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor) -> Tensor:
    """(n, j) logits of rows `h` (n, d) at `ids` (n, j), through only the lm_head rows used."""
    uniq, inverse = torch.unique(ids, return_inverse=True)  # (u,), (n, j)
    z = h @ weight[uniq].T  # (n, u)
    if bias is not None:
        z = z + bias[uniq]
    return _wide(z).gather(1, inverse)
