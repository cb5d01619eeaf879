"""Exact top-k of logits by block preselection, with the log-sum-exps that come with it.

torch.topk over [16384, 128256] bf16 logits costs ~10x a read of them on an H100 (issue 3).
Here one pass computes, for every block of b columns, its max and its log-sum-exp (at T = 1
and at extra temperatures): one compiled kernel on CUDA, so each logit is read once. The top-k
then only needs the k blocks with the largest maxima and the k * b logits in them: two small
top-k's (over V / b maxima, then over k * b candidates) instead of one over V. Ties go to the
lower id everywhere, without a sync: an entry's position breaks the tie through a second top-k
over integer keys.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FUSE_ON_CUDA", "block_size", "chunk_top"]

FUSE_ON_CUDA = True
"""Compile the per-block pass with torch.compile on CUDA (one read of each logit chunk)."""


def block_size(width: int, k: int) -> int:
    """The block width that makes the two selection steps of `chunk_top` about equal in size.

    Picking k of `width / b` block maxima, then k of the `k * b` logits in the chosen blocks,
    costs about `width / b + k * b`, least at b = sqrt(width / k); a power of two below it.
    """
    ratio = width / max(k, 1)
    return 1 << max(0, int(math.log2(ratio) / 2)) if ratio >= 4 else 1


def chunk_top(
    z: Tensor, k: int, temperatures: tuple[float, ...], block: int | None, *, scratch: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exact top-k of z (r, c), plus its lse, the lse outside the top-k and the lse at each T.

    The k-th largest logit of a row lies in one of the k blocks with the largest maxima (each
    of k blocks ranked above its block holds an element ranked above it), so a pass computes
    each block's max and log-sum-exp, k blocks are picked by their maxima (ties: lower block),
    and only the k * b logits in them are gathered and ranked. Returns the top-k values (r, k)
    float32 descending with ties by lower id, their local ids (r, k), the lse (r,), the lse of
    everything but the top-k (r,), and the lse of z / T (r, m) for each T in `temperatures`.
    With `scratch`, z is a fresh chunk that may be overwritten (saves a copy on the CPU).
    """
    c = z.shape[1]
    b = min(block or block_size(c, k), c)
    parts = _blocks(z, b)
    if _fuse(z):  # one compiled kernel reads each logit once for both
        stats = [_fused()(p, temperatures) for p, _ in parts]
        maxima, block_lse = (torch.cat(x, 1) for x in zip(*stats, strict=True))
    else:
        maxima, block_lse = torch.cat([p.amax(dim=2).float() for p, _ in parts], 1), None
    chosen = _top_positions(maxima, min(k, maxima.shape[1]), ranked=False).sort(dim=1).values
    ids = (chosen.unsqueeze(2) * b + torch.arange(b, device=z.device)).flatten(1)  # ascending
    cand = z.gather(1, ids.clamp(max=c - 1)).float().masked_fill_(ids >= c, -torch.inf)
    if block_lse is None:  # after the gather, as it may overwrite z
        block_lse = torch.cat(
            [
                _block_lse(p, m, temperatures, in_place=scratch or fresh)
                for (p, fresh), m in zip(
                    parts, maxima.split([p.shape[1] for p, _ in parts], 1), strict=True
                )
            ],
            1,
        )
    pos = _top_positions(cand, k, ranked=True)
    values, top_ids = cand.gather(1, pos), ids.gather(1, pos)
    all_lse = block_lse.logsumexp(dim=1)  # (r, 1 + m)
    rest = torch.logaddexp(
        block_lse[..., 0].scatter(1, chosen, -torch.inf).logsumexp(dim=1),
        cand.scatter_(1, pos, -torch.inf).logsumexp(dim=1),
    )
    return values, top_ids, all_lse[:, 0], rest, all_lse[:, 1:]


def _top_positions(x: Tensor, k: int, *, ranked: bool) -> Tensor:
    """Positions (r, k) of the k largest entries per row of x (r, w); ties go to lower positions.

    torch.topk finds the k-th value; the set is then every entry above it plus the lowest
    positions equal to it, found by a second top-k over integer keys, so no row needs a sync.
    With `ranked`, positions come ordered by value descending, then position ascending.
    """
    w = x.shape[1]
    kth = x.topk(k, dim=1).values[:, -1:]
    pos = torch.arange(w, device=x.device, dtype=torch.int32)
    key = torch.where(x > kth, pos - w, torch.where(x == kth, pos, w))
    first = key.topk(k, dim=1, largest=False).values  # above the k-th first, then ties
    # NaN compares false everywhere and may leave keys of w: clamp keeps the gather in range,
    # and check_finite reports the row through its lse.
    chosen = torch.where(first < 0, first + w, first).clamp_(max=w - 1).long()
    if not ranked:
        return chosen
    order = x.gather(1, chosen).sort(dim=1, descending=True, stable=True).indices
    return chosen.gather(1, order)


def _blocks(z: Tensor, b: int) -> list[tuple[Tensor, bool]]:
    """z (r, c) as blocks (r, nb, b): a view of the whole blocks, then the rest padded with -inf
    (a fresh copy: the bool says so)."""
    r, c = z.shape
    whole = c - c % b
    parts = [(z[:, :whole].view(r, whole // b, b), False)] if whole else []
    if whole < c:
        rest = F.pad(z[:, whole:].float(), (0, b - (c - whole)), value=-torch.inf)
        parts.append((rest.view(r, 1, b), True))
    return parts


def _block_lse(
    blocks: Tensor, maxima: Tensor, temperatures: tuple[float, ...], *, in_place: bool
) -> Tensor:
    """Log-sum-exp (r, nb, 1 + m) of blocks (r, nb, b) with maxima (r, nb), at T = 1 and each T.

    Each block is shifted by its own max, so a tail block far below the row's max keeps its
    digits (a shift by the row max would underflow after ~87 nats). Accumulates in float32.
    `in_place`: blocks may be overwritten (a float32 copy of other dtypes always may be).
    """
    shift = torch.where(torch.isfinite(maxima), maxima, 0.0).unsqueeze(2)  # all -inf: no NaN
    x = blocks.float()
    mine = in_place or blocks.dtype != torch.float32
    d = x.sub_(shift) if mine and not temperatures else x - shift
    lse = [((d / t).exp_().sum(dim=2).log_() + shift[..., 0] / t) for t in temperatures]
    return torch.stack([d.exp_().sum(dim=2).log_() + shift[..., 0], *lse], dim=2)


def _stats(blocks: Tensor, temperatures: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Max (r, nb) and log-sum-exp (r, nb, 1 + m) of blocks (r, nb, b): the pass CUDA compiles."""
    maxima = blocks.amax(dim=2).float()
    return maxima, _block_lse(blocks, maxima, temperatures, in_place=False)


def _fuse(z: Tensor) -> bool:
    """Whether the block pass over z runs compiled (CUDA: eager would read z once per op)."""
    return z.is_cuda and FUSE_ON_CUDA


@functools.cache
def _fused() -> Callable[[Tensor, tuple[float, ...]], tuple[Tensor, Tensor]]:
    return torch.compile(_stats, dynamic=True)
