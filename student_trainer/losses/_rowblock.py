"""A per-token loss through the lm_head in blocks of rows, its gradient taken on the way.

Every loss here but a few is a mean over token positions of a per-position term. For those the
[N, V] logits are never needed at once: each block of R rows computes its (R, V) logits, the
block's share of the loss, and at once the gradient of that share with respect to the block's
hidden states and the lm_head (bias, auxiliary head), while the block's logits are still there.
The backward then only scales the stored gradients. That is three matmuls per block (logits,
gradient of the hidden states, gradient of the weight), as many as plain dense cross-entropy,
with memory bounded by R x V; `ChunkedStudent` pays a fourth, recomputing the logits in its
backward. Inside a block every loss sees a `DenseStudent`, its exact reference form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

BlockLoss = Callable[..., Tensor]
"""(h_block, *params, rows: slice) -> the block's mean loss, differentiable in h and params."""


def row_block_size(vocab_size: int, budget: int = 1 << 24) -> int:
    """Rows per block so that one float32 (rows, V) tensor holds about `budget` elements."""
    return max(1, budget // max(vocab_size, 1))


def row_blocked_loss(
    block_loss: BlockLoss, hidden: Tensor, *params: Tensor | None, rows_per_block: int
) -> Tensor:
    """The mean over all N rows of `hidden` (N, d) of a per-row loss, as sum_b (R_b / N) * mean_b.

    `block_loss(h_b, *params, rows=slice)` must return the mean over the block's rows of a term
    that depends on row i only through row i (true of every loss that ends in `.mean()` over
    positions). `params` (lm_head weight, bias, ...; None allowed) get their gradients summed
    over blocks. Differentiable in `hidden` and `params`.
    """
    return _RowBlocked.apply(block_loss, rows_per_block, hidden, *params)


class _RowBlocked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block_loss: BlockLoss, rows_per_block: int, h: Tensor, *params):  # type: ignore[override]
        n = h.shape[0]
        wanted = (h.requires_grad, *(p is not None and p.requires_grad for p in params))
        grads: list[Tensor | None] = [
            torch.zeros_like(x) if x is not None and want else None
            for x, want in zip((h, *params), wanted, strict=True)
        ]
        total = torch.zeros((), device=h.device, dtype=torch.float64)
        for start in range(0, n, rows_per_block):
            rows = slice(start, min(start + rows_per_block, n))
            with torch.enable_grad():
                leaves = [
                    None if x is None else x.detach().requires_grad_(want)
                    for x, want in zip((h[rows], *params), wanted, strict=True)
                ]
                share = block_loss(*leaves, rows=rows) * ((rows.stop - rows.start) / n)
                inputs = [x for x, want in zip(leaves, wanted, strict=True) if want]
                got = iter(torch.autograd.grad(share, inputs, allow_unused=True) if inputs else ())
            for i, want in enumerate(wanted):
                if not want:
                    continue
                g = next(got)
                if g is None:
                    continue
                target = grads[i][rows] if i == 0 else grads[i]
                target += g
            total += share.detach().double()
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.present = [g is not None for g in grads]
        return total.to(torch.promote_types(h.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = []
        for present in ctx.present:
            g = next(saved) if present else None
            grads.append(None if g is None else g * grad_out.to(g.dtype))
        return (None, None, *grads)
