"""What the cache keeps of the teacher's distribution, computed on the device in one pass.

`teacher_signals` starts from the final hidden states and the lm_head and walks the vocabulary
in chunks of `vocab_chunk` columns for blocks of `row_chunk` rows: each chunk's logits stay in
the model's dtype, so the [N, V] logits never exist, nor any float32 copy of them on CUDA.

Per chunk, `block_topk.chunk_top` computes the max and the log-sum-exp (at T = 1 and at each
extra temperature) of every block of b columns in one pass; the top-k can only lie in the k
blocks with the largest maxima, so the exact top-k is taken over those k * b logits instead of
the whole row (torch.topk over [16384, 128256] costs ~10x a read of the logits on an H100). The
tail mass is the log-sum-exp of the blocks not picked plus the candidates not kept, a sum of
what is in the tail and never `1 - sum(top-k)`, which cancels when the tail is tiny.

Each chunk gives a small `ChunkPartial` (its candidates, lse's, tail, the label's logit, its
draws), and a `Fold` merges them in vocabulary order: the top-k, the lse, the tail, the logit
of the true next token, and `num_samples` independent draws from
softmax(logits / sample_temperature), each kept as a one-item weighted reservoir that moves to
a new chunk with that chunk's share of the mass. A tensor-parallel teacher runs the same fold
over the partials of every rank's vocabulary slice (`cache_builder.vocab_parallel`).

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
    "ChunkPartial",
    "Fold",
    "NonFiniteError",
    "SignalOptions",
    "TeacherSignals",
    "check_finite",
    "check_labels",
    "chunk_partial",
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
    """How many top ids (and their log-probs) to keep per position (0: samples only)."""
    temperatures: tuple[float, ...] = ()
    """Extra temperatures T whose lse of logits / T is kept."""
    num_samples: int = 0
    """Ids drawn per position from softmax(logits / sample_temperature)."""
    sample_temperature: float = 1.0
    compact_samples: bool = False
    """Keep only the draws outside the top-k, ordered by logit (descending), padding last
    (the cache format from 3.0); False: every draw, ordered by id."""
    vocab_chunk: int = 131072
    """Vocabulary columns per step (131072 covers a Llama-3 vocabulary in one)."""
    row_chunk: int = 2048
    """Positions per step: one step holds row_chunk x vocab_chunk logits."""
    block: int | None = None
    """Block width of the top-k preselection; None: `block_topk.block_size`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", tuple(self.temperatures))
        if self.k < 0 or (self.k == 0 and not self.num_samples):
            raise ValueError(f"k must be at least 1 (or 0 with samples), got {self.k}")
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
    check_labels(labels, num_rows, vocab_size, options)
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


def check_labels(labels: Tensor, num_rows: int, vocab_size: int, options: SignalOptions) -> None:
    """ValueError unless labels are (num_rows,) int64 ids in [0, V) or -1, and k <= V."""
    if options.k > vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {options.k}")
    if labels.shape != (num_rows,) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be ({num_rows},) int64, got {tuple(labels.shape)} {labels.dtype}"
        )
    if num_rows and (int(labels.min()) < -1 or int(labels.max()) >= vocab_size):  # deliberate sync
        raise ValueError(f"labels must be token ids in [0, {vocab_size}) or -1 for no next token")


def _stream_rows(
    chunk: Callable[[int, int], Tensor],
    labels: Tensor,
    vocab_size: int,
    options: SignalOptions,
    generator: torch.Generator | None,
    scratch: bool,
) -> TeacherSignals:
    """One block of r rows: a single walk over the vocabulary, each chunk folded in as it comes."""
    fold = Fold(labels, options)
    for s in range(0, vocab_size, options.vocab_chunk):
        e = min(s + options.vocab_chunk, vocab_size)
        fold.add(chunk_partial(chunk(s, e), s, labels, options, generator, scratch), generator)
    return fold.result()


@dataclass
class ChunkPartial:
    """What the vocabulary columns [start, end) contribute to r rows' signals.

    Small beside the logits: kc = min(k, end - start) candidates and a few scalars per row.
    Chunks of one walk, or vocabulary slices on tensor-parallel ranks, are merged by `Fold`.
    """

    start: int
    end: int
    values: Tensor
    """(r, kc) float32: the chunk's top logits, ranked (ties: lower id first)."""
    ids: Tensor
    """(r, kc) int64: their global token ids."""
    lse: Tensor
    """(r,) log-sum-exp of the chunk's logits."""
    tail: Tensor
    """(r,) log-sum-exp of the chunk's logits outside its own top-kc."""
    extra_lse: Tensor
    """(r, m') log-sum-exp of logits / T for each extra temperature T != 1."""
    label_logit: Tensor
    """(r,) the next token's logit where it lies in [start, end) (anything elsewhere)."""
    draw_ids: Tensor | None = None
    """(r, n) int64: global ids drawn from softmax(chunk logits / sample_temperature)."""
    draw_logit: Tensor | None = None
    """(r, n) float32: the T = 1 logits of those draws."""
    sample_lse: Tensor | None = None
    """(r,) log-sum-exp of the chunk's logits / sample_temperature: its share of the draws."""


def candidates(options: SignalOptions) -> int:
    """Top candidates a chunk ranks: k, and 1 when k = 0 (the fold moves it to the tail)."""
    return max(options.k, 1)


def _extra(options: SignalOptions) -> tuple[float, ...]:
    return tuple(t for t in options.temperatures if t != 1.0)


def chunk_partial(
    z: Tensor,
    start: int,
    labels: Tensor,
    options: SignalOptions,
    generator: torch.Generator | None,
    scratch: bool,
) -> ChunkPartial:
    """The partial of logits z (r, c) for the vocabulary columns [start, start + c).

    `scratch`: z is fresh and may be overwritten. Draws n ids from within the chunk with
    `generator` (the fold decides, with its own draws, which of them the row keeps).
    """
    c, n = z.shape[1], options.num_samples
    at = (labels - start).clamp(0, c - 1).unsqueeze(1)
    label_logit = z.gather(1, at).squeeze(1).float()
    cv, ci, lse, tail, extra = chunk_top(
        z, min(candidates(options), c), _extra(options), options.block, scratch=scratch and not n
    )
    # Contiguous, as a partial that went through a collective is: elementwise kernels round
    # differently in the last bit on strided views, and a tensor-parallel fold must match.
    lse, extra = lse.contiguous(), extra.contiguous()
    out = ChunkPartial(start, start + c, cv, ci + start, lse, tail, extra, label_logit)
    if n:
        zf = z.float()
        t = options.sample_temperature
        zs = zf if t == 1.0 else zf / t
        out.sample_lse = lse if t == 1.0 else torch.logsumexp(zs, dim=1)
        draw = _draw(zs, out.sample_lse, n, generator)
        out.draw_ids, out.draw_logit = draw + start, zf.gather(1, draw)
    return out


class Fold:
    """The running merge of chunk partials of r rows, taken in vocabulary order.

    Keeps the top-k (ranked, ties to the lower id), the lse at T = 1 and at each extra T, the
    lse of everything outside the top-k, the next token's logit, and `num_samples` one-item
    weighted reservoirs: a slot moves to a chunk's draw with probability (chunk mass / mass
    so far), so after the last chunk it holds token i with probability p_i.
    """

    def __init__(self, labels: Tensor, options: SignalOptions) -> None:
        r, dev, n = labels.shape[0], labels.device, options.num_samples
        self.labels, self.options = labels, options
        neg_inf = torch.full((r,), -torch.inf, device=dev)
        self.top_v = torch.empty((r, 0), device=dev)  # (r, <=k) running top-k, ranked
        self.top_i = torch.empty((r, 0), dtype=torch.int64, device=dev)
        self.lse, self.tail = neg_inf, neg_inf  # (r,) lse of all / of non-top-k logits
        self.extra_lse = torch.full((r, len(_extra(options))), -torch.inf, device=dev)
        self.label_logit = torch.full((r,), torch.nan, device=dev)
        self.sample_lse = neg_inf  # (r,) lse at the sample temperature of the chunks so far
        self.sample_ids = torch.zeros((r, n), dtype=torch.int64, device=dev)
        self.sample_logit = torch.zeros((r, n), device=dev)

    def add(self, p: ChunkPartial, generator: torch.Generator | None) -> None:
        """Merge the next chunk (in vocabulary order); `generator` draws the reservoir moves."""
        k = self.options.k
        inside = (self.labels >= p.start) & (self.labels < p.end)
        self.label_logit = torch.where(inside, p.label_logit, self.label_logit)
        self.lse = torch.logaddexp(self.lse, p.lse)
        self.extra_lse = torch.logaddexp(self.extra_lse, p.extra_lse)
        v, i = _rank(torch.cat([self.top_v, p.values], 1), torch.cat([self.top_i, p.ids], 1))
        if v.shape[1] > k:  # candidates that fell out of the top-k join the tail
            self.tail = torch.logaddexp(self.tail, torch.logsumexp(v[:, k:], dim=1))
        self.tail = torch.logaddexp(self.tail, p.tail)
        self.top_v, self.top_i = v[:, :k], i[:, :k]
        if self.options.num_samples:
            assert p.draw_ids is not None and p.draw_logit is not None
            new_lse = torch.logaddexp(self.sample_lse, p.sample_lse)
            p_move = torch.exp(p.sample_lse - new_lse).unsqueeze(1)  # (r, 1)
            u = torch.rand(p.draw_ids.shape, device=p.draw_ids.device, generator=generator)
            moved = u < p_move
            self.sample_ids = torch.where(moved, p.draw_ids, self.sample_ids)
            self.sample_logit = torch.where(moved, p.draw_logit, self.sample_logit)
            self.sample_lse = new_lse

    def result(self) -> TeacherSignals:
        lse, temperatures = self.lse, self.options.temperatures
        lse_col = lse.unsqueeze(1)
        out = TeacherSignals(
            topk_ids=self.top_i,
            topk_logprobs=self.top_v - lse_col,
            lse=lse,
            # k = 0: the tail is everything, exactly (the difference could round above 0)
            log_tail=self.tail - lse if self.options.k else torch.zeros_like(lse),
            label_logprob=self.label_logit - lse,
        )
        if temperatures:
            by_t = dict(zip(_extra(self.options), self.extra_lse.unbind(1), strict=True))
            out.temp_lse = torch.stack([lse if t == 1.0 else by_t[t] for t in temperatures], 1)
        if self.options.num_samples:
            ids, counts, logit = _unique_counts(self.sample_ids, self.sample_logit)
            if self.options.compact_samples:
                ids, counts, logit = _outside_topk(ids, counts, logit, self.top_i, self.top_v)
            out.sample_ids, out.sample_counts = ids, counts
            out.sample_logprobs = logit - lse_col
        return out


def _outside_topk(
    ids: Tensor, counts: Tensor, logit: Tensor, top_i: Tensor, top_v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Compact samples: the distinct ids outside the top-k, by logit (descending, ties by id),
    then padding (count 0) that repeats the last of them, so the log-probs stay sorted for the
    value encoding; a row with none repeats its k-th top-k entry."""
    inside = (ids.unsqueeze(-1) == top_i.unsqueeze(1)).any(-1)  # (r, n)
    counts = counts.masked_fill(inside, 0)
    key = torch.where(counts > 0, logit, -torch.inf)  # ids ascend: a stable sort keeps ties so
    order = key.sort(dim=1, descending=True, stable=True).indices
    ids, counts, logit = (a.gather(1, order) for a in (ids, counts, logit))
    last = ((counts > 0).sum(1, keepdim=True) - 1).clamp_min(0)  # (r, 1)
    fill_i, fill_v = ids.gather(1, last), logit.gather(1, last)
    if top_i.shape[1]:  # rows with no draw outside the top-k (k = 0 has none such)
        empty = counts[:, :1] == 0
        fill_i = torch.where(empty, top_i[:, -1:], fill_i)
        fill_v = torch.where(empty, top_v[:, -1:], fill_v)
    pad = counts == 0
    return torch.where(pad, fill_i, ids), counts, torch.where(pad, fill_v, logit)


def _rank(v: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Order candidates (r, m) by value descending, then id ascending (ids are distinct)."""
    by_id = i.argsort(dim=1)
    v, i = v.gather(1, by_id), i.gather(1, by_id)
    by_value = v.sort(dim=1, descending=True, stable=True).indices
    return v.gather(1, by_value), i.gather(1, by_value)


def _draw(zs: Tensor, chunk_lse: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """n local ids (r, n) drawn with replacement from softmax(zs) within the chunk.

    A row with no mass here (or NaN/inf, which check_finite reports) draws uniformly: the fold
    never moves a slot to it, as its share of the mass is 0.
    """
    dead = ~torch.isfinite(chunk_lse)
    shift = torch.where(dead, 0.0, chunk_lse).unsqueeze(1)
    probs = (zs - shift).exp_().masked_fill_(dead.unsqueeze(1), 1.0)  # (r, c)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


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
