"""What the cache keeps of the teacher's distribution, computed on the device in one pass.

`teacher_signals` starts from the final hidden states and the lm_head and walks the vocabulary
in chunks of `vocab_chunk` columns for blocks of `row_chunk` rows: each chunk's logits stay in
the model's dtype, so the [N, V] logits never exist, nor any float32 copy of them on CUDA.

Per chunk, `block_topk.chunk_top` computes the max and the log-sum-exp (at T = 1 and at each
extra temperature) of every block of b columns in one pass; the top-k can only lie in the k
blocks with the largest maxima, so the exact top-k is taken over those k * b logits instead of
the whole row (torch.topk over [16384, 128256] costs ~10x a read of the logits on an H100). The
tail mass is the log-sum-exp of the blocks not picked plus the candidates not kept, a sum of
what is in the tail and never `1 - sum(top-k)`, which cancels when the tail is tiny. Running
merges across chunks keep the top-k, the lse, the tail, the logit of the true next token, and
`num_samples` independent draws from softmax(logits / sample_temperature), each kept as a
one-item weighted reservoir that moves to a new chunk with that chunk's share of the mass.

Top-k ties are broken by the lower token id: torch.topk picks among equal logits arbitrarily
(on the CPU it differs from run to run of the same input), and a cache must not depend on that.
The values always equal torch.topk's; the ids equal torch.topk's wherever there are no ties.

`teacher_signals_from_logits` gives the same outputs from logits a model computed itself (for
heads that are not a plain linear layer). `check_finite` is the one deliberate sync that turns
NaN or inf into an error naming the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from cache_builder.block_topk import chunk_top
from schemas.errors import KdcacheError

__all__ = [
    "NonFiniteError",
    "SignalOptions",
    "TeacherSignals",
    "check_finite",
    "teacher_signals",
    "teacher_signals_from_logits",
]

ChunkFn = Callable[[int, int, int, int], Tensor]
"""(row_start, row_end, vocab_start, vocab_end) -> logits (rows, vocab) in any float dtype."""


@dataclass(frozen=True)
class SignalOptions:
    """What to keep of the teacher's distribution, and how to walk its logits.

    For a fixed seed the samples also depend on `vocab_chunk` and `row_chunk`, so keep those
    fixed for a reproducible cache.
    """

    k: int
    """How many top ids (and their log-probs) to keep per position."""
    temperatures: tuple[float, ...] = ()
    """Extra temperatures T whose lse of logits / T is kept."""
    num_samples: int = 0
    """Ids drawn per position from softmax(logits / sample_temperature)."""
    sample_temperature: float = 1.0
    vocab_chunk: int = 131072
    """Vocabulary columns per step (131072 covers a Llama-3 vocabulary in one)."""
    row_chunk: int = 2048
    """Positions per step: one step holds row_chunk x vocab_chunk logits."""
    block: int | None = None
    """Block width of the top-k preselection; None: `block_topk.block_size`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", tuple(self.temperatures))
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if any(not t > 0 for t in self.temperatures) or not self.sample_temperature > 0:
            raise ValueError(
                f"temperatures must be > 0, got {self.temperatures}, {self.sample_temperature}"
            )
        if (
            self.num_samples < 0
            or self.vocab_chunk < 1
            or self.row_chunk < 1
            or (self.block is not None and self.block < 1)
        ):
            raise ValueError("num_samples must be >= 0 and vocab_chunk, row_chunk, block >= 1")


class NonFiniteError(KdcacheError, ValueError):
    """The teacher produced NaN or inf (hidden states, or logits seen through their lse)."""


@dataclass
class TeacherSignals:
    """What the cache stores about the teacher at N token positions (device tensors).

    Shapes use N for positions, k for the top-k, m for extra temperatures, n for samples.
    """

    topk_ids: Tensor
    """(N, k) int64: the teacher's k most likely ids, in rank order (ties: lower id first)."""
    topk_logprobs: Tensor
    """(N, k) float32: log-probabilities at `topk_ids`, non-increasing along k."""
    lse: Tensor
    """(N,) float32: log-sum-exp of the logits over the full vocabulary."""
    log_tail: Tensor
    """(N,) float32: log of the probability mass outside the top-k; -inf when k = V."""
    label_logprob: Tensor
    """(N,) float32: log-probability of the next token; NaN where there is none (label -1)."""
    temp_lse: Tensor | None = None
    """(N, m) float32: log-sum-exp of logits / T for each extra temperature T."""
    sample_ids: Tensor | None = None
    """(N, n) int64: distinct sampled ids, ascending; padding repeats the first id."""
    sample_counts: Tensor | None = None
    """(N, n) int32: draws that gave each id (sums to n per row); 0 marks padding."""
    sample_logprobs: Tensor | None = None
    """(N, n) float32: log-probabilities at T = 1 of `sample_ids`."""

    @property
    def num_rows(self) -> int:
        return self.lse.shape[0]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TeacherSignals:
        """The same signals on `device` (e.g. "cpu" before encoding)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **moved)

    @staticmethod
    def cat(parts: Sequence[TeacherSignals]) -> TeacherSignals:
        """Concatenate signals of consecutive row blocks."""
        if len(parts) == 1:
            return parts[0]
        joined = {}
        for f in fields(TeacherSignals):
            values = [getattr(p, f.name) for p in parts]
            joined[f.name] = None if values[0] is None else torch.cat(values)
        return TeacherSignals(**joined)


def check_finite(
    x: Tensor, *, batch_index: int, name: str = "hidden states", shard: int | None = None
) -> None:
    """Raise `NonFiniteError` naming `batch_index` (and `shard`) if `x` holds NaN or +-inf.

    Use it on the hidden states and on `TeacherSignals.lse`. A logit of -inf is legal (that
    token has probability 0); the lse of a row is finite exactly when its logits are legal (no
    NaN, no +inf, not all -inf), so checking the lse checks logits the chunked path never holds.
    This syncs with the device once.
    """
    bad = ~torch.isfinite(x)
    if bool(bad.any()):  # deliberate sync: one flag per batch
        first = tuple(bad.nonzero()[0].tolist())
        where = f"batch {batch_index}" if shard is None else f"shard {shard} batch {batch_index}"
        raise NonFiniteError(
            f"{where}: the teacher's {name} contain NaN or inf "
            f"({int(bad.sum())} of {x.numel()} values; first at index {first} of shape "
            f"{tuple(x.shape)})",
            hint="a half-precision teacher may overflow, so rebuild with --dtype float32; if it "
            "persists, check the teacher's weights and this batch's tokens",
        )


def teacher_signals(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    options: SignalOptions,
    *,
    generator: torch.Generator | None = None,
    logit_transform: Callable[[Tensor], Tensor] | None = None,
) -> TeacherSignals:
    """Teacher signals at N positions from hidden states (N, d) and an lm_head (V, d) [+ (V,)].

    Logits are `hidden @ weight.T + bias` in the model's dtype, one (row_chunk, vocab_chunk)
    block at a time; `logit_transform` (an elementwise map such as logit softcapping), if
    given, is applied to a float32 copy of the block. `labels` (N,) int64 holds the next
    token, -1 for none. Samples come from `generator` (on the same device).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, d) and weight (V, d) must share d: got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")

    def chunk(r0: int, r1: int, s: int, e: int) -> Tensor:
        b = None if bias is None else bias[s:e]
        z = F.linear(hidden[r0:r1], weight[s:e], b)  # (r, c) in the model's dtype
        return z if logit_transform is None else logit_transform(z.float())

    return _stream(chunk, hidden.shape[0], weight.shape[0], labels, options, generator, True)


def teacher_signals_from_logits(
    logits: Tensor,
    labels: Tensor,
    options: SignalOptions,
    *,
    generator: torch.Generator | None = None,
) -> TeacherSignals:
    """The same signals from logits (N, V) in any float dtype, which are read, never written.

    Equal logits in the same dtype give bit-identical signals to `teacher_signals` (and the
    same samples for the same generator).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, V), got {tuple(logits.shape)}")

    def chunk(r0: int, r1: int, s: int, e: int) -> Tensor:
        return logits[r0:r1, s:e]

    return _stream(chunk, logits.shape[0], logits.shape[1], labels, options, generator, False)


def _stream(
    chunk: ChunkFn,
    num_rows: int,
    vocab_size: int,
    labels: Tensor,
    options: SignalOptions,
    generator: torch.Generator | None,
    scratch: bool,
) -> TeacherSignals:
    """`chunk` gives logits blocks; `scratch`: each is fresh and may be overwritten."""
    if options.k > vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {options.k}")
    if labels.shape != (num_rows,) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be ({num_rows},) int64, got {tuple(labels.shape)} {labels.dtype}"
        )
    if num_rows and (int(labels.min()) < -1 or int(labels.max()) >= vocab_size):  # deliberate sync
        raise ValueError(f"labels must be token ids in [0, {vocab_size}) or -1 for no next token")
    step = options.row_chunk
    parts = [
        _stream_rows(
            functools.partial(chunk, r0, min(r0 + step, num_rows)),
            labels[r0 : r0 + step],
            vocab_size,
            options,
            generator,
            scratch,
        )
        for r0 in range(0, max(num_rows, 1), step)
    ]
    return TeacherSignals.cat(parts)


def _stream_rows(
    chunk: Callable[[int, int], Tensor],
    labels: Tensor,
    vocab_size: int,
    options: SignalOptions,
    generator: torch.Generator | None,
    scratch: bool,
) -> TeacherSignals:
    """One block of r rows: a single walk over the vocabulary."""
    k, temperatures, vocab_chunk = options.k, options.temperatures, options.vocab_chunk
    sample_temperature = options.sample_temperature
    r, dev, n = labels.shape[0], labels.device, options.num_samples
    neg_inf = torch.full((r,), -torch.inf, device=dev)
    top_v = torch.empty((r, 0), device=dev)  # (r, <=k) running top-k, ranked
    top_i = torch.empty((r, 0), dtype=torch.int64, device=dev)
    lse, tail = neg_inf, neg_inf  # (r,) running log-sum-exp of all / of non-top-k logits
    extra = tuple(t for t in temperatures if t != 1.0)
    extra_lse = torch.full((r, len(extra)), -torch.inf, device=dev)
    label_logit = torch.full((r,), torch.nan, device=dev)
    if n:
        sample_lse = neg_inf  # (r,) running lse at the sample temperature
        sample_ids = torch.zeros((r, n), dtype=torch.int64, device=dev)
        sample_logit = torch.zeros((r, n), device=dev)

    for s in range(0, vocab_size, vocab_chunk):
        e = min(s + vocab_chunk, vocab_size)
        z = chunk(s, e)  # (r, c) in the model's dtype (float32 after a transform)
        c, kc = e - s, min(k, e - s)

        inside = (labels >= s) & (labels < e)
        at = (labels - s).clamp(0, c - 1).unsqueeze(1)
        label_logit = torch.where(inside, z.gather(1, at).squeeze(1).float(), label_logit)

        cv, ci, chunk_lse, chunk_tail, chunk_extra = chunk_top(
            z, kc, extra, options.block, scratch=scratch and not n
        )
        lse = torch.logaddexp(lse, chunk_lse)
        extra_lse = torch.logaddexp(extra_lse, chunk_extra)
        v, i = _rank(torch.cat([top_v, cv], 1), torch.cat([top_i, ci + s], 1))
        if v.shape[1] > k:  # candidates that fell out of the top-k join the tail
            tail = torch.logaddexp(tail, torch.logsumexp(v[:, k:], dim=1))
        tail = torch.logaddexp(tail, chunk_tail)
        top_v, top_i = v[:, :k], i[:, :k]

        if n:
            zf = z.float()
            zs = zf if sample_temperature == 1.0 else zf / sample_temperature
            cl = chunk_lse if sample_temperature == 1.0 else torch.logsumexp(zs, dim=1)
            ids, logit, sample_lse = _reservoir_step(zs, zf, cl, sample_lse, n, generator)
            moved = ids >= 0
            sample_ids = torch.where(moved, ids + s, sample_ids)
            sample_logit = torch.where(moved, logit, sample_logit)

    lse_col = lse.unsqueeze(1)
    out = TeacherSignals(
        topk_ids=top_i,
        topk_logprobs=top_v - lse_col,
        lse=lse,
        log_tail=tail - lse,
        label_logprob=label_logit - lse,
    )
    if temperatures:
        by_t = dict(zip(extra, extra_lse.unbind(1), strict=True))
        out.temp_lse = torch.stack([lse if t == 1.0 else by_t[t] for t in temperatures], 1)
    if n:
        out.sample_ids, out.sample_counts, logit = _unique_counts(sample_ids, sample_logit)
        out.sample_logprobs = logit - lse_col
    return out


def _rank(v: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Order candidates (r, m) by value descending, then id ascending (ids are distinct)."""
    by_id = i.argsort(dim=1)
    v, i = v.gather(1, by_id), i.gather(1, by_id)
    by_value = v.sort(dim=1, descending=True, stable=True).indices
    return v.gather(1, by_value), i.gather(1, by_value)


def _reservoir_step(
    zs: Tensor,
    z: Tensor,
    chunk_lse: Tensor,
    seen_lse: Tensor,
    n: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Move each of n slots into this chunk with probability (chunk mass / mass so far).

    zs (r, c) are the chunk's logits at the sample temperature and `chunk_lse` their lse; `z`
    the T = 1 logits. Returns (local id or -1 if the slot stays, T = 1 logit, new seen lse).
    A slot that ends in this chunk holds token i with probability p_i overall.
    """
    new_lse = torch.logaddexp(seen_lse, chunk_lse)
    p_move = torch.exp(chunk_lse - new_lse).unsqueeze(1)  # (r, 1)
    dead = ~torch.isfinite(chunk_lse)  # no mass here (or NaN/inf, which check_finite reports)
    shift = torch.where(dead, 0.0, chunk_lse).unsqueeze(1)
    probs = (zs - shift).exp_().masked_fill_(dead.unsqueeze(1), 1.0)  # (r, c)
    draw = torch.multinomial(probs, n, replacement=True, generator=generator)  # (r, n)
    u = torch.rand(draw.shape, device=z.device, generator=generator)
    moved = u < p_move
    return torch.where(moved, draw, -1), z.gather(1, draw), new_lse


def _unique_counts(ids: Tensor, logit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: distinct ids (ascending), their counts, their logits; padded with count 0."""
    ids, order = ids.sort(dim=1)
    logit = logit.gather(1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = first.long().cumsum(1) - 1  # (r, n) slot of each draw's distinct id
    counts = torch.zeros_like(ids, dtype=torch.int32).scatter_add_(
        1, group, torch.ones_like(ids, dtype=torch.int32)
    )
    uniq = torch.zeros_like(ids).scatter_(1, group, ids)  # equal ids write equal values
    ulogit = torch.zeros_like(logit).scatter_(1, group, logit)
    pad = counts == 0
    uniq = torch.where(pad, uniq[:, :1], uniq)  # padding repeats a real (id, logit) pair
    ulogit = torch.where(pad, ulogit[:, :1], ulogit)
    return uniq, counts, ulogit
