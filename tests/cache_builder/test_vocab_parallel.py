"""The vocabulary-parallel merge on real gloo process groups (2-4 ranks, uneven slices).

Each rank holds a slice of the lm_head rows; the merged signals must equal a one-process fold
over the same chunk boundaries bit for bit, and the one-chunk pass to float tolerance with the
same ids. Samples are checked as draws from the full distribution (chi-square) and for a seed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cache_builder.topk import (
    Fold,
    SignalOptions,
    TeacherSignals,
    chunk_partial,
    teacher_signals,
)
from cache_builder.vocab_parallel import VocabSlices, vocab_parallel_signals

FIELDS = ("topk_ids", "topk_logprobs", "lse", "log_tail", "label_logprob", "temp_lse")


def _cases() -> dict[str, dict]:
    """Inputs every rank rebuilds from fixed seeds: hidden (N, d), weight (V, d), labels."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 96, 8, 203
    hidden = torch.randn(n, d, generator=g)
    labels = torch.randint(-1, v, (n,), generator=g)
    plain = torch.randn(v, d, generator=g)
    tied = plain.clone()
    tied[150] = tied[3]  # equal logits in different slices: the lower id must rank first
    tied[190] = tied[3]
    raised = torch.zeros(v)
    raised[[3, 150, 190]] = 6.0  # ... and they are in the top-k of most rows
    lifted = torch.zeros(v)
    lifted[120:140] = 50.0  # the whole top-k lies in one slice
    bias = torch.zeros(v)
    bias[::7] = -math.inf  # tokens of probability 0
    return {
        "plain": dict(hidden=hidden, weight=plain, bias=None, labels=labels),
        "ties": dict(hidden=hidden, weight=tied, bias=raised, labels=labels),
        "one-slice-top-k": dict(hidden=hidden, weight=plain, bias=lifted, labels=labels),
        "neg-inf": dict(hidden=hidden, weight=plain, bias=bias, labels=labels),
    }


OPTIONS = SignalOptions(k=6, temperatures=(2.0, 1.0), vocab_chunk=40, row_chunk=64)
SAMPLED = SignalOptions(k=2, num_samples=8, vocab_chunk=3, row_chunk=4096)


def _sample_input() -> dict:
    """One small distribution repeated over many rows: the chi-square test's draws."""
    g = torch.Generator().manual_seed(5)
    v, rows = 11, 3000
    weight = torch.randn(v, 1, generator=g) * 1.5
    return dict(hidden=torch.ones(rows, 1), weight=weight, labels=torch.full((rows,), -1))


def _worker(rank: int, world: int, store: str, sizes: list[int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        slices = VocabSlices.gather(sizes[rank])
        results = {}
        for name, case in _cases().items():
            bias = case["bias"]
            results[name] = vocab_parallel_signals(
                case["hidden"],
                case["weight"][mine],
                None if bias is None else bias[mine],
                case["labels"],
                OPTIONS,
                slices,
            )
        s = _sample_input()
        sample_sizes = [len(x) for x in torch.arange(11).tensor_split(world)]
        sample_slices = VocabSlices.gather(sample_sizes[rank])
        a = sum(sample_sizes[:rank])
        for seed in (0, 0, 1):
            gen = torch.Generator().manual_seed(seed * 1000 + rank)
            results.setdefault("samples", []).append(
                vocab_parallel_signals(
                    s["hidden"],
                    s["weight"][a : a + sample_sizes[rank]],
                    None,
                    s["labels"],
                    SAMPLED,
                    sample_slices,
                    generator=gen,
                )
            )
        # The one-process reference, in this process: the bits of a matmul or a reduction may
        # depend on the thread count, which differs between the test and its workers.
        chunk_bounds = [c for per_rank in slices.chunks(OPTIONS.vocab_chunk) for c in per_rank]
        reference = {
            name: _fold_over(case, chunk_bounds, OPTIONS) for name, case in _cases().items()
        }
        torch.save(
            {"slices": slices.bounds, "results": results, "reference": reference}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, sizes: list[int]) -> list[dict]:
    world = len(sizes)
    out = str(tmp_path / "out")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), sizes, out), nprocs=world)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def _fold_over(case: dict, bounds: list[tuple[int, int]], options: SignalOptions) -> TeacherSignals:
    """One process folding the chunks [s, e) in order: what every rank must reproduce exactly."""
    parts = []
    for r0 in range(0, case["hidden"].shape[0], options.row_chunk):
        h = case["hidden"][r0 : r0 + options.row_chunk]
        lab = case["labels"][r0 : r0 + options.row_chunk]
        fold = Fold(lab, options)
        for s, e in bounds:
            bias = case["bias"]
            z = torch.nn.functional.linear(
                h, case["weight"][s:e], None if bias is None else bias[s:e]
            )
            fold.add(chunk_partial(z, s, lab, options, None, scratch=True), None)
        parts.append(fold.result())
    return TeacherSignals.cat(parts)


def _equal(a: TeacherSignals, b: TeacherSignals, *, exact: bool) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if name == "topk_ids" or exact:
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize(
    "sizes", [[101, 102], [1, 150, 52], [50, 50, 50, 53], [200, 1, 1, 1]], ids=str
)
def test_merged_slices_equal_the_one_process_pass(tmp_path, sizes):
    ranks = _run(tmp_path, sizes)
    bounds = ranks[0]["slices"]
    assert [e - s for s, e in bounds] == sizes
    for name, case in _cases().items():
        one_chunk = teacher_signals(
            case["hidden"], case["weight"], case["bias"], case["labels"], OPTIONS
        )
        exact = ranks[0]["reference"][name]
        for rank in ranks:  # every rank holds the merged signals
            _equal(rank["results"][name], rank["reference"][name], exact=True)
            _equal(rank["results"][name], one_chunk, exact=False)
        if name == "ties":  # tied logits in three slices: ids 3 < 150 < 190, in that order
            rows = [r for r in exact.topk_ids.tolist() if {3, 150, 190} <= set(r)]
            assert len(rows) > 10
            assert all(r.index(3) + 1 == r.index(150) == r.index(190) - 1 for r in rows)
        if name == "one-slice-top-k":
            assert ((exact.topk_ids >= 120) & (exact.topk_ids < 140)).all()
        if name == "neg-inf":
            assert not (exact.topk_ids % 7 == 0).any()
            assert torch.isfinite(exact.lse).all()

    # samples: deterministic for a seed, valid draws from the full distribution
    first, again, other = ranks[0]["results"]["samples"]
    for name in ("sample_ids", "sample_counts", "sample_logprobs"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.sample_ids, other.sample_ids)
    s = _sample_input()
    logits = (s["hidden"][:1] @ s["weight"].T).squeeze(0).double()
    p = logits.softmax(0)
    draws = first.sample_counts.sum().item()
    assert draws == s["hidden"].shape[0] * SAMPLED.num_samples
    counts = torch.zeros(11, dtype=torch.float64).index_add_(
        0, first.sample_ids.flatten(), first.sample_counts.flatten().double()
    )
    chi2 = float(((counts - draws * p) ** 2 / (draws * p)).sum())
    assert chi2 < 29.6, chi2  # 10 degrees of freedom: P(chi2 > 29.6) = 0.001
    torch.testing.assert_close(
        first.sample_logprobs,
        (logits - logits.logsumexp(0)).float()[first.sample_ids],
        rtol=0,
        atol=1e-5,
    )
