"""Teacher signals when the lm_head is split by vocabulary over tensor-parallel ranks.

With transformers' tensor parallelism the lm_head weight is a DTensor sharded on its vocabulary
dimension: rank t holds rows [start_t, end_t) of W (V, d). Gathering the logits would put the
full [rows, V] block on every rank, the one thing the chunked pass exists to avoid. Instead
each rank walks only its own slice, in the same `vocab_chunk` steps as a one-rank build, and
turns each chunk into a `ChunkPartial` (kc candidates and a few scalars per row). The ranks
all-gather those partials, and every rank folds them in vocabulary order with the same `Fold`
a one-rank walk uses, so the result is bit for bit what one process walking the same chunk
boundaries stores. A one-rank build of the default `--vocab-chunk` walks other boundaries (one
chunk where TP has one per slice), so its lse's differ from a TP build's in the last bits.

Samples: each rank draws within its own chunks from its own generator, and the fold's
reservoir moves come from the folding rank's generator, so every slot is a draw from the full
distribution; the draws depend on the seed and on the vocabulary layout (`--tp`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from cache_builder.topk import (
    ChunkPartial,
    Fold,
    SignalOptions,
    TeacherSignals,
    candidates,
    check_labels,
    chunk_partial,
)

__all__ = ["VocabSlices", "vocab_parallel_signals"]


@dataclass(frozen=True)
class VocabSlices:
    """Which vocabulary rows each tensor-parallel rank holds, and which rank this is."""

    bounds: tuple[tuple[int, int], ...]
    """[start, end) of each rank's slice, in rank order, covering [0, V) without gaps."""
    rank: int
    group: dist.ProcessGroup | None = None
    """The tensor-parallel process group (None: the default group)."""

    @classmethod
    def gather(cls, local_rows: int, group: dist.ProcessGroup | None = None) -> VocabSlices:
        """The slices of a vocabulary split in rank order, from each rank's number of rows."""
        sizes = [None] * dist.get_world_size(group)
        dist.all_gather_object(sizes, local_rows, group=group)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        bounds = tuple(zip([0, *ends[:-1]], ends, strict=True))
        return cls(bounds, dist.get_rank(group), group)

    @property
    def vocab_size(self) -> int:
        return self.bounds[-1][1]

    @property
    def start(self) -> int:
        return self.bounds[self.rank][0]

    def chunks(self, vocab_chunk: int) -> list[list[tuple[int, int]]]:
        """Per rank, the global [start, end) of each `vocab_chunk`-wide step over its slice."""
        return [
            [(s, min(s + vocab_chunk, e)) for s in range(s0, e, vocab_chunk)]
            for s0, e in self.bounds
        ]


def vocab_parallel_signals(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    options: SignalOptions,
    slices: VocabSlices,
    *,
    generator: torch.Generator | None = None,
    logit_transform: Callable[[Tensor], Tensor] | None = None,
) -> TeacherSignals:
    """Teacher signals at N positions from hidden states (N, d) and this rank's lm_head rows.

    `weight` (V_t, d) [and `bias` (V_t,)] are the local rows [start_t, end_t) of the head;
    hidden states and labels (global ids, -1 for none) are the same on every rank. Every rank
    of the group must call this with the same N; every rank returns the merged signals.
    """
    own = slices.bounds[slices.rank]
    if weight.ndim != 2 or weight.shape[0] != own[1] - own[0]:
        raise ValueError(f"weight must hold this rank's rows {own}, got {tuple(weight.shape)}")
    num_rows = hidden.shape[0]
    check_labels(labels, num_rows, slices.vocab_size, options)
    chunks = slices.chunks(options.vocab_chunk)
    parts = []
    for r0 in range(0, max(num_rows, 1), options.row_chunk):
        h, lab = hidden[r0 : r0 + options.row_chunk], labels[r0 : r0 + options.row_chunk]
        local = []
        for s, e in chunks[slices.rank]:
            a, b = s - own[0], e - own[0]
            z = F.linear(h, weight[a:b], None if bias is None else bias[a:b])
            if logit_transform is not None:
                z = logit_transform(z.float())
            local.append(chunk_partial(z, s, lab, options, generator, scratch=True))
        fold = Fold(lab, options)
        for partial in _all_gather(local, chunks, options, slices.group):
            fold.add(partial, generator)
        parts.append(fold.result())
    return TeacherSignals.cat(parts)


def _all_gather(
    local: list[ChunkPartial],
    chunks: list[list[tuple[int, int]]],
    options: SignalOptions,
    group: dist.ProcessGroup | None,
) -> list[ChunkPartial]:
    """Every rank's chunk partials, in vocabulary order: one all-gather of floats, one of ids.

    Each rank sends the same shape (the most chunks any rank has, each padded to k candidates);
    the padding is cut off again by the known chunk bounds, so it never enters the fold.
    """
    most = max(len(c) for c in chunks)
    floats, ints = zip(*(_pack(p, options) for p in local), strict=True) if local else ((), ())
    template_f, template_i = _pack_shapes(local, options)
    floats = list(floats) + [torch.zeros_like(template_f)] * (most - len(local))
    ints = list(ints) + [torch.zeros_like(template_i)] * (most - len(local))
    send_f, send_i = torch.stack(floats), torch.stack(ints)
    got_f = [torch.empty_like(send_f) for _ in chunks]
    got_i = [torch.empty_like(send_i) for _ in chunks]
    dist.all_gather(got_f, send_f, group=group)
    dist.all_gather(got_i, send_i, group=group)
    return [
        _unpack(got_f[t][j], got_i[t][j], s, e, options)
        for t, rank_chunks in enumerate(chunks)
        for j, (s, e) in enumerate(rank_chunks)
    ]


def _widths(options: SignalOptions) -> tuple[int, int, int]:
    m = sum(t != 1.0 for t in options.temperatures)
    n = options.num_samples
    return candidates(options), m, n


def _pack(p: ChunkPartial, options: SignalOptions) -> tuple[Tensor, Tensor]:
    """(r, k + 3 + m + [n + 1]) float32 and (r, k + n) int64 holding the partial."""
    k, _, n = _widths(options)
    pad = k - p.values.shape[1]
    values = F.pad(p.values, (0, pad), value=-torch.inf)
    ids = F.pad(p.ids, (0, pad))
    floats = [values, p.lse[:, None], p.tail[:, None], p.extra_lse, p.label_logit[:, None]]
    ints = [ids]
    if n:
        assert p.draw_ids is not None and p.draw_logit is not None and p.sample_lse is not None
        floats += [p.draw_logit, p.sample_lse[:, None]]
        ints.append(p.draw_ids)
    return torch.cat(floats, 1).float(), torch.cat(ints, 1)


def _pack_shapes(local: list[ChunkPartial], options: SignalOptions) -> tuple[Tensor, Tensor]:
    """Zero tensors of the packed shapes, for the padding chunks of a rank with fewer chunks."""
    k, m, n = _widths(options)
    r, dev = (local[0].lse.shape[0], local[0].lse.device) if local else (0, "cpu")
    width_f = k + 3 + m + (n + 1 if n else 0)
    return torch.zeros((r, width_f), device=dev), torch.zeros(
        (r, k + n), dtype=torch.int64, device=dev
    )


def _unpack(
    floats: Tensor, ints: Tensor, start: int, end: int, options: SignalOptions
) -> ChunkPartial:
    """The partial `_pack` packed, as contiguous tensors: elementwise kernels take another
    (vectorised) path on strided views, which rounds differently in the last bit."""
    k, m, n = _widths(options)
    kc = min(k, end - start)

    def col(a: int, b: int | None = None) -> Tensor:
        return floats[:, a : a + 1 if b is None else b].contiguous()

    out = ChunkPartial(
        start,
        end,
        values=col(0, kc),
        ids=ints[:, :kc].contiguous(),
        lse=col(k).squeeze(1),
        tail=col(k + 1).squeeze(1),
        extra_lse=col(k + 2, k + 2 + m),
        label_logit=col(k + 2 + m).squeeze(1),
    )
    if n:
        out.draw_logit = col(k + 3 + m, k + 3 + m + n)
        out.sample_lse = col(k + 3 + m + n).squeeze(1)
        out.draw_ids = ints[:, k : k + n].contiguous()
    return out
