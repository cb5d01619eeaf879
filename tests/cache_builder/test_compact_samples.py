"""Compact samples from the top-k pass: the same draws as the full listing, minus those inside
the top-k, ordered by logit with padding last; and samples-only signals (k = 0)."""

from __future__ import annotations

import math

import pytest
import torch

from cache_builder.topk import SignalOptions, teacher_signals_from_logits


def _signals(z, k, n, compact, seed=2, vocab_chunk=7):
    labels = torch.zeros(z.shape[0], dtype=torch.int64)
    options = SignalOptions(
        k=k, num_samples=n, compact_samples=compact, vocab_chunk=vocab_chunk, row_chunk=64
    )
    return teacher_signals_from_logits(
        z, labels, options, generator=torch.Generator().manual_seed(seed)
    )


def _listed(ids, counts, lp):
    return [
        {int(i): (int(c), float(v)) for i, c, v in zip(r_i, r_c, r_v, strict=True) if c > 0}
        for r_i, r_c, r_v in zip(ids, counts, lp, strict=True)
    ]


@pytest.mark.parametrize("k", [1, 4, 40])  # 40 = V: no draw ever falls outside
def test_compact_lists_the_same_draws_outside_the_top_k(k):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 40, generator=g) * 2.0
    z[3, 7] = -math.inf
    full, compact = _signals(z, k, 12, False), _signals(z, k, 12, True)
    assert torch.equal(full.topk_ids, compact.topk_ids) and torch.equal(full.lse, compact.lse)
    every = _listed(full.sample_ids, full.sample_counts, full.sample_logprobs)
    kept = _listed(compact.sample_ids, compact.sample_counts, compact.sample_logprobs)
    for row, (a, b) in enumerate(zip(every, kept, strict=True)):
        top = set(full.topk_ids[row].tolist())
        assert b == {i: cv for i, cv in a.items() if i not in top}, row
    used = compact.sample_counts > 0
    assert (used[:, 1:] <= used[:, :-1]).all()  # padding last
    lp = compact.sample_logprobs.masked_fill(~used, -math.inf)
    assert not (lp[:, 1:] > lp[:, :-1]).any()  # by descending log-prob
    # padding repeats the last listed entry, or the k-th top-k entry in a row with none
    last = (used.sum(1) - 1).clamp_min(0)
    rows = torch.arange(len(z))
    fill_i = torch.where(used[:, 0], compact.sample_ids[rows, last], compact.topk_ids[:, -1])
    assert (compact.sample_ids.masked_fill(used, -1) == fill_i[:, None].masked_fill(used, -1)).all()
    if k == 40:
        assert not used.any()


def test_samples_only_lists_every_draw_and_the_whole_tail():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(300, 40, generator=g) * 1.5
    s = _signals(z, 0, 16, True)
    assert s.topk_ids.shape == (300, 0) and s.topk_logprobs.shape == (300, 0)
    assert (s.log_tail == 0).all() and (s.sample_counts.sum(1) == 16).all()
    exact = torch.logsumexp(z.double(), 1).float()
    torch.testing.assert_close(s.lse, exact, rtol=0, atol=1e-5)
    freq = torch.zeros(40, dtype=torch.float64).index_add_(
        0, s.sample_ids.flatten(), s.sample_counts.flatten().double()
    )
    # 4,800 draws pooled over rows against the mean of the rows' distributions
    target = z.double().softmax(1).mean(0) * 4800
    chi2 = float(((freq - target) ** 2 / target).sum())
    assert chi2 < 77.4  # the p = 0.001 critical value for 39 degrees of freedom


def test_k_0_needs_samples():
    with pytest.raises(ValueError, match="0 with samples"):
        SignalOptions(k=0)
