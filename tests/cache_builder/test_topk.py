"""Chunked teacher signals against torch.topk and a dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_builder import block_topk
from cache_builder.block_topk import block_size
from cache_builder.topk import (
    NonFiniteError,
    SignalOptions,
    TeacherSignals,
    check_finite,
    teacher_signals,
    teacher_signals_from_logits,
)

FIELDS = [
    "topk_ids",
    "topk_logprobs",
    "lse",
    "log_tail",
    "label_logprob",
    "temp_lse",
    "sample_ids",
    "sample_counts",
    "sample_logprobs",
]


def _reference(z: torch.Tensor, labels: torch.Tensor, k: int, temperatures=()) -> dict:
    """Dense float64 answers; top-k ranked by value, then lower id (a stable sort)."""
    z64 = z.double()
    lse = z64.logsumexp(1)
    ranked = torch.sort(z, dim=1, descending=True, stable=True)
    ids = ranked.indices[:, :k]
    rest = z64.scatter(1, ids, -math.inf)
    label = z64.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) - lse
    return {
        "ids": ids,
        "values": ranked.values[:, :k],
        "lse": lse,
        "log_tail": rest.logsumexp(1) - lse,
        "label_logprob": torch.where(labels >= 0, label, math.nan),
        "temp_lse": torch.stack([(z64 / t).logsumexp(1) for t in temperatures], 1)
        if temperatures
        else None,
    }


def _same(a: TeacherSignals, b: TeacherSignals) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), name
            assert torch.equal(x.isnan(), y.isnan()), name


def _int_inputs(n: int, v: int, d: int, dtype: torch.dtype, seed: int):
    """Small-integer hidden states, weight and bias: their logits are exact in any dtype."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    w = torch.randint(-3, 4, (v, d), generator=g).to(dtype)
    b = torch.randint(-2, 3, (v,), generator=g).to(dtype)
    labels = torch.randint(-1, v, (n,), generator=g)
    return h, w, b, labels


@pytest.mark.parametrize(
    ("k", "vocab_chunk", "row_chunk"),
    [(8, 64, 64), (8, 5, 7), (20, 300, 3), (1, 17, 100), (64, 50, 16)],
)
def test_from_logits_matches_torch_topk_and_float64(k, vocab_chunk, row_chunk):
    g = torch.Generator().manual_seed(k + vocab_chunk)
    n, v = 37, 300
    z = torch.randn(n, v, generator=g) * 3
    z[:, 7::31] = -math.inf  # legal: tokens the teacher rules out
    labels = torch.randint(-1, v, (n,), generator=g)
    labels[::5] = -1
    temps = (0.5, 1.0, 2.0)
    s = teacher_signals_from_logits(
        z,
        labels,
        SignalOptions(k=k, temperatures=temps, vocab_chunk=vocab_chunk, row_chunk=row_chunk),
    )
    top = torch.topk(z, k)  # continuous values: no ties, so torch.topk is exact here
    assert torch.equal(s.topk_ids, top.indices)
    assert torch.equal(s.topk_logprobs, top.values - s.lse.unsqueeze(1))
    assert s.topk_ids.dtype == torch.int64 and s.topk_logprobs.dtype == torch.float32
    ref = _reference(z, labels, k, temps)
    torch.testing.assert_close(s.lse.double(), ref["lse"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.log_tail.double(), ref["log_tail"], rtol=0, atol=2e-5)
    torch.testing.assert_close(
        s.label_logprob.double(), ref["label_logprob"], equal_nan=True, rtol=0, atol=2e-5
    )
    assert s.label_logprob[labels == -1].isnan().all()
    torch.testing.assert_close(s.temp_lse.double(), ref["temp_lse"], rtol=1e-6, atol=1e-6)
    assert torch.equal(s.temp_lse[:, 1], s.lse)
    assert (s.topk_logprobs[:, 1:] <= s.topk_logprobs[:, :-1]).all()


@pytest.mark.parametrize("vocab_chunk", [3, 16, 40, 200])
def test_ties_and_neg_inf_break_by_lower_id(vocab_chunk):
    g = torch.Generator().manual_seed(vocab_chunk)
    n, v, k = 64, 200, 12
    z = torch.randint(0, 4, (n, v), generator=g).float()  # every row is full of ties
    z[n // 2 :, torch.randperm(v, generator=g)[: v - 5]] = -math.inf  # k > finite: -inf ties
    labels = torch.randint(0, v, (n,), generator=g)
    s = teacher_signals_from_logits(
        z, labels, SignalOptions(k=k, vocab_chunk=vocab_chunk, row_chunk=20)
    )
    ref = _reference(z, labels, k)
    top = torch.topk(z, k)
    assert torch.equal(s.topk_ids, ref["ids"])  # ties: lower id first
    assert torch.equal(s.topk_logprobs + s.lse.unsqueeze(1), top.values)
    assert torch.equal(z.gather(1, s.topk_ids), top.values)  # a valid top-k, like torch's
    torch.testing.assert_close(s.log_tail.double(), ref["log_tail"], rtol=0, atol=2e-5)
    assert s.log_tail[n // 2 :].isneginf().all()  # only -inf logits remain outside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_path_is_bit_identical_to_logits_path(dtype):
    h, w, b, labels = _int_inputs(50, 130, 16, dtype, seed=3)
    options = SignalOptions(k=10, temperatures=(2.0,), num_samples=6, vocab_chunk=32, row_chunk=16)
    chunked = teacher_signals(h, w, b, labels, options, generator=torch.Generator().manual_seed(5))
    dense = teacher_signals_from_logits(
        F.linear(h, w, b), labels, options, generator=torch.Generator().manual_seed(5)
    )
    _same(chunked, dense)
    ref = _reference(F.linear(h, w, b).float(), labels, 10)
    assert torch.equal(chunked.topk_ids, ref["ids"])  # integer logits tie a lot


def test_no_bias_and_transform():
    h, w, _, labels = _int_inputs(20, 64, 8, torch.float32, seed=4)
    cap = 5.0

    def softcap(z: torch.Tensor) -> torch.Tensor:
        return cap * torch.tanh(z / cap)

    s = teacher_signals(
        h, w, None, labels, SignalOptions(k=4, vocab_chunk=10), logit_transform=softcap
    )
    z = softcap(h @ w.T)
    ref = _reference(z, labels, 4)
    assert torch.equal(s.topk_ids, ref["ids"])
    torch.testing.assert_close(s.lse.double(), ref["lse"], rtol=1e-6, atol=1e-6)


def test_tiny_tail_is_exact():
    g = torch.Generator().manual_seed(0)
    n, v = 8, 500
    z = torch.randn(n, v, generator=g)
    z[:, 3] = torch.linspace(30, 60, n)  # one token holds all but ~e^-30..e^-60 of the mass
    labels = torch.full((n,), 3)
    s = teacher_signals_from_logits(z, labels, SignalOptions(k=1, vocab_chunk=64))
    ref = _reference(z, labels, 1)
    assert torch.isfinite(s.log_tail).all()  # 1 - p_top is exactly 0 in float32
    torch.testing.assert_close(s.log_tail.double(), ref["log_tail"], rtol=1e-6, atol=1e-5)
    assert (s.log_tail < -20).all()
    assert torch.equal(s.label_logprob, s.topk_logprobs[:, 0])


def test_k_equal_to_vocab_has_no_tail():
    z = torch.randn(5, 33)
    s = teacher_signals_from_logits(
        z, torch.zeros(5, dtype=torch.int64), SignalOptions(k=33, vocab_chunk=8)
    )
    assert s.log_tail.isneginf().all()
    assert torch.equal(s.topk_ids, torch.sort(z, dim=1, descending=True, stable=True).indices)
    torch.testing.assert_close(s.topk_logprobs.exp().sum(1), torch.ones(5))


@pytest.mark.parametrize("sample_temperature", [1.0, 2.0])
def test_samples_converge_to_the_distribution(sample_temperature):
    g = torch.Generator().manual_seed(1)
    v, n_rows, n = 40, 1500, 16
    row = torch.randn(v, generator=g) * 1.5
    row[5] = -math.inf  # never drawn
    z = row.expand(n_rows, v).contiguous()
    labels = torch.full((n_rows,), -1)
    s = teacher_signals_from_logits(
        z,
        labels,
        SignalOptions(
            k=3, num_samples=n, sample_temperature=sample_temperature, vocab_chunk=7, row_chunk=512
        ),
        generator=torch.Generator().manual_seed(2),
    )
    assert s.sample_ids.shape == (n_rows, n) and s.sample_ids.dtype == torch.int64
    assert s.sample_counts.dtype == torch.int32
    assert (s.sample_counts.sum(1) == n).all()
    used = s.sample_counts > 0
    # distinct and ascending where used; padding (count 0) sits at the end with a valid id
    assert (used[:, 1:] <= used[:, :-1]).all()
    assert ((s.sample_ids[:, 1:] > s.sample_ids[:, :-1]) | ~used[:, 1:]).all()
    assert ((s.sample_ids >= 0) & (s.sample_ids < v)).all()
    logprobs = (row.double() - row.double().logsumexp(0)).float()
    torch.testing.assert_close(s.sample_logprobs, logprobs[s.sample_ids], rtol=0, atol=1e-5)
    freq = torch.zeros(v, dtype=torch.float64).index_add_(
        0, s.sample_ids.flatten(), s.sample_counts.flatten().double()
    ) / (n_rows * n)
    target = (row.double() / sample_temperature).softmax(0)
    assert freq[5] == 0
    # 24,000 draws: the standard error of each frequency is below 0.0032
    assert (freq - target).abs().max() < 0.015


def test_samples_are_reproducible_and_seed_dependent():
    z = torch.randn(10, 90)
    labels = torch.zeros(10, dtype=torch.int64)

    def draw(seed: int) -> TeacherSignals:
        gen = torch.Generator().manual_seed(seed)
        return teacher_signals_from_logits(
            z, labels, SignalOptions(k=2, num_samples=8, vocab_chunk=20), generator=gen
        )

    _same(draw(0), draw(0))
    assert not torch.equal(draw(0).sample_ids, draw(1).sample_ids)


def test_check_finite_names_the_batch():
    z = torch.randn(6, 50)
    z[1, 3] = -math.inf  # legal
    z[2, 10] = math.nan
    z[4, 0] = math.inf
    z[5] = -math.inf  # no legal token at all
    s = teacher_signals_from_logits(
        z, torch.zeros(6, dtype=torch.int64), SignalOptions(k=4, num_samples=3, vocab_chunk=16)
    )
    assert torch.isfinite(s.lse[[0, 1, 3]]).all()
    assert not torch.isfinite(s.lse[[2, 4, 5]]).any()
    with pytest.raises(NonFiniteError, match=r"batch 17\b.*index \(2,\)") as err:
        check_finite(s.lse, batch_index=17, name="logits (through their lse)")
    assert isinstance(err.value, ValueError) and "float32" in str(err.value)
    hidden = torch.zeros(2, 3, 4)
    check_finite(hidden, batch_index=0)
    hidden[1, 2, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"batch 3: the teacher's hidden states.*\(1, 2, 0\)"):
        check_finite(hidden, batch_index=3)


def test_empty_batch_and_bad_arguments():
    w = torch.randn(20, 4)
    s = teacher_signals(
        torch.randn(0, 4),
        w,
        None,
        torch.zeros(0, dtype=torch.int64),
        SignalOptions(k=3, num_samples=2),
    )
    assert s.topk_ids.shape == (0, 3) and s.sample_ids.shape == (0, 2) and s.num_rows == 0
    h, labels = torch.randn(2, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="k must be"):
        teacher_signals(h, w, None, labels, SignalOptions(k=21))
    with pytest.raises(ValueError, match="labels must be token ids"):
        teacher_signals(h, w, None, torch.tensor([0, 20]), SignalOptions(k=2))
    with pytest.raises(ValueError, match="share d"):
        teacher_signals(h, torch.randn(20, 5), None, labels, SignalOptions(k=2))
    with pytest.raises(ValueError, match="temperatures"):
        teacher_signals(h, w, None, labels, SignalOptions(k=2, temperatures=(0.0,)))


@pytest.mark.gpu
def test_cuda_bf16_chunked_topk_matches_torch_topk():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n, v, d, k, chunk = 1024, 50_000, 256, 64, 8192
    h = torch.randn(n, d, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, d, device=dev, generator=g) * 0.1).bfloat16()
    labels = torch.randint(-1, v, (n,), device=dev, generator=g)
    s = teacher_signals(
        h,
        w,
        None,
        labels,
        SignalOptions(k=k, num_samples=8, vocab_chunk=chunk, row_chunk=512),
        generator=g,
    )
    # the same bf16 logits, block by block as the chunked path computes them
    z = torch.cat(
        [
            torch.cat(
                [F.linear(h[r : r + 512], w[c : c + chunk]).float() for c in range(0, v, chunk)], 1
            )
            for r in range(0, n, 512)
        ]
    )
    top = torch.topk(z, k)
    assert torch.equal(s.topk_logprobs + s.lse.unsqueeze(1), top.values)
    assert torch.equal(z.gather(1, s.topk_ids), top.values)
    assert torch.equal(
        s.topk_ids, torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]
    )
    ref = _reference(z.cpu(), labels.cpu(), k)
    torch.testing.assert_close(s.lse.cpu().double(), ref["lse"], rtol=0, atol=1e-5)
    torch.testing.assert_close(s.log_tail.cpu().double(), ref["log_tail"], rtol=0, atol=1e-4)
    torch.testing.assert_close(
        s.label_logprob.cpu().double(), ref["label_logprob"], equal_nan=True, rtol=0, atol=1e-4
    )
    assert (s.sample_counts.sum(1) == 8).all()
    dense = teacher_signals_from_logits(
        z, labels, SignalOptions(k=k, vocab_chunk=chunk, row_chunk=512)
    )
    for name in ("topk_ids", "topk_logprobs", "lse", "log_tail"):
        assert torch.equal(getattr(s, name), getattr(dense, name)), name


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    v=st.integers(1, 90),
    k=st.integers(1, 90),
    vocab_chunk=st.integers(1, 100),
    block=st.one_of(st.none(), st.integers(1, 40)),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_block_preselection_is_exact_on_ties(n, v, k, vocab_chunk, block, levels, seed):
    """Few distinct values (ties everywhere, incl. -inf) against a stable sort in float64."""
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, levels, (n, v), generator=g).float()
    z[torch.rand(n, v, generator=g) < 0.2] = -math.inf
    z[0] = -math.inf if n > 1 else z[0]  # a row with nothing legal: lse -inf, but no crash
    labels = torch.randint(-1, v, (n,), generator=g)
    s = teacher_signals_from_logits(
        z, labels, SignalOptions(k=k, temperatures=(3.0,), vocab_chunk=vocab_chunk, block=block)
    )
    ref = _reference(z, labels, k, (3.0,))
    legal = torch.isfinite(ref["lse"])
    assert torch.equal(s.topk_ids[legal], ref["ids"][legal])
    assert torch.equal(z.gather(1, s.topk_ids), ref["values"])
    torch.testing.assert_close(s.lse.double(), ref["lse"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.temp_lse.double(), ref["temp_lse"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        s.log_tail[legal].double(), ref["log_tail"][legal], rtol=0, atol=2e-5
    )


def test_block_maxima_tied_across_the_boundary():
    """Every block holds the same maximum: the k lowest blocks must win, and inside them the
    k lowest ids of that maximum; values just below it in later blocks must not leak in."""
    v, b, k = 64, 8, 3
    z = torch.zeros(2, v)
    z[:, ::b] = 5.0  # each block's first entry is the max, 8 blocks tie
    z[1, 40:48] = 5.0  # a whole block of maxima ties too
    labels = torch.zeros(2, dtype=torch.int64)
    s = teacher_signals_from_logits(z, labels, SignalOptions(k=k, block=b))
    assert s.topk_ids.tolist() == [[0, 8, 16], [0, 8, 16]]
    s = teacher_signals_from_logits(z, labels, SignalOptions(k=10, block=b))
    assert s.topk_ids[1].tolist() == [0, 8, 16, 24, 32, 40, 41, 42, 43, 44]
    assert torch.equal(s.topk_ids, _reference(z, labels, 10)["ids"])


def test_top_k_inside_one_block_and_spread_over_blocks():
    g = torch.Generator().manual_seed(7)
    v, k = 1000, 16
    z = torch.randn(2, v, generator=g)
    z[0, 512 : 512 + k] = 10 + torch.arange(k).float()  # all of it in one block (b = 8 here)
    z[1, torch.randperm(v, generator=g)[:k]] = 10 + torch.arange(k).float()
    labels = torch.zeros(2, dtype=torch.int64)
    for block in (None, 1, 4, 64, 1000):
        s = teacher_signals_from_logits(z, labels, SignalOptions(k=k, block=block))
        ref = _reference(z, labels, k)
        assert torch.equal(s.topk_ids, ref["ids"]), block
        torch.testing.assert_close(s.log_tail.double(), ref["log_tail"], rtol=0, atol=2e-5)


def test_block_size_balances_the_two_selections():
    assert block_size(128256, 64) == 32  # sqrt(2004) = 44.8
    assert block_size(8192, 64) == 8  # sqrt(128) = 11.3
    assert block_size(100, 64) == 1
    assert block_size(300, 8) == 4
    for width, k in [(10**6, 1), (50_000, 200), (7, 7)]:
        b = block_size(width, k)
        assert b >= 1 and b & (b - 1) == 0 and b * b <= width / k


def test_bfloat16_logits_are_read_without_an_upcast_copy_of_the_whole():
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(40, 700, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 700, (40,), generator=g)
    s = teacher_signals_from_logits(
        z, labels, SignalOptions(k=9, temperatures=(2.0,), vocab_chunk=256)
    )
    ref = _reference(z.float(), labels, 9, (2.0,))
    assert torch.equal(s.topk_ids, ref["ids"])  # bf16 ties are common: lower id first
    torch.testing.assert_close(s.lse.double(), ref["lse"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(s.log_tail.double(), ref["log_tail"], rtol=0, atol=2e-5)
    torch.testing.assert_close(s.temp_lse.double(), ref["temp_lse"], rtol=1e-6, atol=1e-5)


def test_compiled_block_pass_matches_eager(monkeypatch):
    """The CUDA path compiles the block pass; compile it here on the CPU to check it."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(33, 1500, generator=g) * 3
    z[:, ::97] = -math.inf
    labels = torch.randint(-1, 1500, (33,), generator=g)
    options = SignalOptions(k=12, temperatures=(0.5, 2.0), vocab_chunk=700)
    eager = teacher_signals_from_logits(z, labels, options)
    monkeypatch.setattr(block_topk, "_fuse", lambda z: True)
    fused = teacher_signals_from_logits(z, labels, options)
    assert torch.equal(fused.topk_ids, eager.topk_ids)
    for name in ("topk_logprobs", "lse", "log_tail", "temp_lse", "label_logprob"):
        torch.testing.assert_close(
            getattr(fused, name), getattr(eager, name), rtol=1e-6, atol=1e-5, equal_nan=True
        )


@pytest.mark.gpu
def test_cuda_fused_block_pass_matches_torch_topk_at_llama_vocab():
    """[4096, 128256] bf16 logits: the compiled path against torch.topk and a float64 lse."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    z = (torch.randn(4096, 128256, device=dev, generator=g) * 3).bfloat16()
    labels = torch.randint(-1, 128256, (4096,), device=dev, generator=g)
    s = teacher_signals_from_logits(z, labels, SignalOptions(k=64, temperatures=(2.0,)))
    zf = z.float()
    top = torch.topk(zf, 64)
    assert torch.equal(s.topk_logprobs + s.lse.unsqueeze(1), top.values)
    assert torch.equal(
        s.topk_ids, torch.sort(zf, dim=1, descending=True, stable=True).indices[:, :64]
    )
    torch.testing.assert_close(s.lse.double(), zf.double().logsumexp(1), rtol=0, atol=1e-5)
    rest = zf.double().scatter(1, s.topk_ids, -math.inf).logsumexp(1) - s.lse.double()
    torch.testing.assert_close(s.log_tail.double(), rest, rtol=0, atol=1e-4)
