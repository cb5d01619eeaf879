"""The teacher signal as the losses see it: a typed record of torch tensors.

Losses never see raw dicts or numpy arrays. The trainer turns decoded shard records into a
`TeacherBatch` whose rows are the token positions that carry a training target (positions with
no next token are dropped before any loss runs), so no loss has to handle a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class TeacherBatch:
    """What the cache knows about the teacher at N token positions.

    Shapes use N for positions, k for the cached top-k, n for sampled ids, m for the number of
    extra temperatures stored at build time.
    """

    ids: Tensor
    """(N, k) int64: the teacher's top-k token ids, in the teacher's rank order."""
    logprobs: Tensor
    """(N, k) float32: teacher log-probabilities at `ids` (<= 0, non-increasing along k)."""
    lse: Tensor
    """(N,) float32: log-sum-exp of the raw teacher logits over the full vocabulary."""
    log_tail: Tensor
    """(N,) float32: log(1 - sum(exp(logprobs))), from the exact logits; -inf when k = V."""
    labels: Tensor
    """(N,) int64: the actual next token at each position."""
    label_logprob: Tensor
    """(N,) float32: the teacher's log-probability of `labels` (exact even outside the top-k)."""
    vocab_size: int
    """V: size of the teacher's (and student's) output vocabulary."""
    temperatures: tuple[float, ...] = ()
    """The distillation temperatures whose log-sum-exp was stored at build time."""
    temp_lse: Tensor | None = None
    """(N, m) float32: log-sum-exp of logits / T for each T in `temperatures`."""
    sample_ids: Tensor | None = None
    """(N, n) int64: unique ids drawn from the teacher distribution (padding has count 0)."""
    sample_counts: Tensor | None = None
    """(N, n) float32: how many of the draws gave each id; 0 marks padding."""
    sample_logprobs: Tensor | None = None
    """(N, n) float32: teacher log-probabilities at `sample_ids` (at T = 1)."""
    sample_temperature: float = 1.0
    """Temperature of the proposal the samples were drawn from."""
    num_draws: int = 0
    """n: draws per position at build time. A cache with compact samples lists only the draws
    outside the top-k, so `sample_counts` then add up to n minus those that fell inside it;
    0: every draw is listed (the counts add up to n)."""

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def draws(self) -> Tensor:
        """(N,) or scalar: the draws per position, listed or not."""
        assert self.sample_counts is not None
        return self.num_draws if self.num_draws else self.sample_counts.sum(-1)

    @property
    def logits(self) -> Tensor:
        """(N, k) raw teacher logits at `ids`: exact, because logprob + lse = logit."""
        return self.logprobs + self.lse.unsqueeze(-1)

    def lse_at(self, temperature: float) -> Tensor | None:
        """(N,) stored log-sum-exp of logits / T, or None when T was not stored at build time."""
        if temperature == 1.0:
            return self.lse
        for i, t in enumerate(self.temperatures):
            if abs(t - temperature) < 1e-6 and self.temp_lse is not None:
                return self.temp_lse[:, i]
        return None

    def to(self, device: torch.device | str) -> TeacherBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def select(self, rows: Tensor) -> TeacherBatch:
        """The batch restricted to `rows` (an index or boolean tensor over N)."""
        picked = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **picked)


def teacher_batch_from_logits(
    logits: Tensor,
    labels: Tensor,
    k: int,
    *,
    temperatures: tuple[float, ...] = (),
    num_samples: int = 0,
    sample_temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> TeacherBatch:
    """The `TeacherBatch` a cache would hold for dense teacher `logits` (N, V).

    Computed exactly as the builder defines each field (in float64 where it matters), so tests can
    compare a cached loss with its dense reference, and the online-KD baseline can feed the same
    loss functions from a live teacher.
    """
    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    logp = z - lse.unsqueeze(-1)  # (N, V)
    top_lp, top_ids = logp.topk(k, dim=-1)  # (N, k), rank order
    # log of the tail mass as a log-sum-exp over the ids outside the top-k (no cancellation);
    # -inf when the top-k covers the whole vocabulary.
    log_tail = logp.scatter(-1, top_ids, -torch.inf).logsumexp(-1)
    temp_lse = (
        torch.stack([torch.logsumexp(z / t, dim=-1) for t in temperatures], dim=-1).float()
        if temperatures
        else None
    )
    sample_ids = sample_counts = sample_lp = None
    if num_samples:
        probs = torch.softmax(z / sample_temperature, dim=-1)
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        sample_ids, sample_counts = unique_counts(draws)
        sample_lp = logp.gather(-1, sample_ids).float()
    return TeacherBatch(
        ids=top_ids,
        logprobs=top_lp.float(),
        lse=lse.float(),
        log_tail=log_tail.float(),
        labels=labels,
        label_logprob=logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float(),
        vocab_size=z.shape[-1],
        temperatures=tuple(temperatures),
        temp_lse=temp_lse,
        sample_ids=sample_ids,
        sample_counts=sample_counts,
        sample_logprobs=sample_lp,
        sample_temperature=sample_temperature,
    )


def unique_counts(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of `draws` (N, n), the distinct ids and their counts, padded to n with count 0.

    Ids come out ascending with padding at the end (padding repeats the row's first id, so it is
    always a valid index).
    """
    sorted_draws, _ = draws.sort(dim=-1)
    is_new = torch.ones_like(sorted_draws, dtype=torch.bool)
    is_new[:, 1:] = sorted_draws[:, 1:] != sorted_draws[:, :-1]
    slot = is_new.long().cumsum(-1) - 1  # (N, n): which unique id each draw belongs to
    counts = torch.zeros(draws.shape, dtype=torch.float32, device=draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(counts))
    ids = sorted_draws[:, :1].expand_as(sorted_draws).clone()
    ids.scatter_(1, slot, sorted_draws)
    return ids, counts


@dataclass(frozen=True)
class StudentInputs:
    """What the student model sees for a batch of B sequences padded to L."""

    input_ids: Tensor
    """(B, L) int64, padded with 0."""
    attention_mask: Tensor
    """(B, L) int64, 1 on real tokens."""
    rows: Tensor
    """(N,) int64 flat indices into (B * L) of the positions that have a next token."""

    def to(self, device: torch.device | str) -> StudentInputs:
        return StudentInputs(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.rows)
            )
        )


def collate(
    sequences: list,
    layout_vocab: int,
    temperatures: tuple[float, ...] = (),
    sample_temperature: float = 1.0,
    num_samples: int = 0,
) -> tuple[StudentInputs, TeacherBatch]:
    """Pad sequences into student inputs and gather the teacher rows that have a next token.

    This is where numpy becomes torch. Row t of a sequence of n tokens is trained on when
    t < n - 1: its label is token t + 1. `num_samples` is the cache's `layout.num_samples`,
    needed where samples are stored (a compact cache lists only some of the draws).
    """
    import numpy as np

    lengths = [len(s) for s in sequences]
    b, l_max = len(sequences), max(lengths)
    input_ids = np.zeros((b, l_max), dtype=np.int64)
    mask = np.zeros((b, l_max), dtype=np.int64)
    rows, picked = [], {name: [] for name in sequences[0].arrays}
    labels = []
    for i, (seq, n) in enumerate(zip(sequences, lengths, strict=False)):
        ids = seq.arrays["input_ids"]
        input_ids[i, :n] = ids
        mask[i, :n] = 1
        rows.append(i * l_max + np.arange(n - 1))
        labels.append(ids[1:])
        for name, value in seq.arrays.items():
            picked[name].append(value[: n - 1])
    if "sample_ids" in picked and not num_samples:
        raise ValueError("collate: these sequences hold samples; pass layout.num_samples")
    cat = {name: np.concatenate(parts) for name, parts in picked.items()}
    t = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in cat.items()}
    teacher = TeacherBatch(
        ids=t["topk_ids"].long(),
        logprobs=t["topk_logprobs"],
        lse=t["lse"],
        log_tail=t["log_tail"],
        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        label_logprob=t["label_logprob"],
        vocab_size=layout_vocab,
        temperatures=tuple(temperatures),
        temp_lse=t.get("temp_lse"),
        sample_ids=t["sample_ids"].long() if "sample_ids" in t else None,
        sample_counts=t["sample_counts"].float() if "sample_counts" in t else None,
        sample_logprobs=t.get("sample_logprobs"),
        sample_temperature=sample_temperature,
        num_draws=num_samples,
    )
    inputs = StudentInputs(
        torch.from_numpy(input_ids),
        torch.from_numpy(mask),
        torch.from_numpy(np.concatenate(rows).astype(np.int64)),
    )
    return inputs, teacher
