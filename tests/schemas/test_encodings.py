"""Property tests of the top-k encodings: exact ids, values within the stated bound, order kept."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas._lehmer import lehmer_decode, lehmer_encode
from schemas.encodings import (
    BOUND_RANGE,
    ID_ENCODINGS,
    VALUE_ENCODINGS,
    Column,
    TopkEncoding,
    default_encoding,
)

ALL = [TopkEncoding(i, v) for i, v in itertools.product(ID_ENCODINGS, VALUE_ENCODINGS)]
SPECIAL = [0.0, -0.0, -1e-30, -6e-8, -1.0, -15.97, -32.0, -65504.0, -65520.0, -1e30, -3.4e38]


@st.composite
def topk(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids (N, k), logprobs (N, k), vocab_size) obeying the input contract."""
    vocab = draw(st.one_of(st.integers(1, 300), st.integers(1, 1 << 20), st.just(1 << 16)))
    k = draw(st.integers(1, min(vocab, 140)))
    n = draw(st.integers(0, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(["uniform", "low", "edges"]))
    rows = []
    for _ in range(n):
        if style == "low":  # crowd the low ids, as a real top-k does
            pool = min(vocab, 2 * k + draw(st.integers(0, 50)))
            rows.append(rng.choice(pool, size=k, replace=False))
        elif style == "edges":  # the largest ids, in random order
            rows.append(rng.permutation(np.arange(vocab - k, vocab)))
        else:
            rows.append(rng.choice(vocab, size=k, replace=False))
    ids = np.array(rows, dtype=np.int64).reshape(n, k)
    scale = draw(st.sampled_from([1e-4, 0.05, 1.0, 4.0, 100.0, 1e5]))
    raw = -rng.exponential(scale, size=(n, k)) * draw(st.sampled_from([0.0, 1.0]))
    specials = draw(st.lists(st.sampled_from(SPECIAL), max_size=4))
    raw = raw - rng.exponential(scale, size=(n, 1)) * draw(st.booleans())  # top-1 below 0
    if specials and raw.size:
        raw.flat[rng.integers(0, raw.size, len(specials))] = specials
    if draw(st.booleans()) and raw.size:  # ties: coarse values
        raw = np.round(raw * 4) / 4
    logprobs = -np.sort(-raw.astype(np.float32), axis=1)  # non-increasing, <= 0
    return ids, logprobs, vocab


def _check_round_trip(enc: TopkEncoding, ids: np.ndarray, lp: np.ndarray, vocab: int) -> None:
    n, k = ids.shape
    cols = enc.columns(k, vocab)
    parts = enc.encode(ids, lp, vocab)
    assert set(parts) == set(cols)
    for name, col in cols.items():
        assert isinstance(col, Column) and col.name == name
        assert parts[name].dtype == np.dtype(col.dtype), name
        assert parts[name].shape == (n, *col.shape), name
        assert col.shuffle in ("bitshuffle", "shuffle", "noshuffle")
        parts[name].setflags(write=False)  # decode must not write into what a reader gives it
    dec_ids, dec_lp = enc.decode(parts)
    assert dec_ids.dtype == np.int32 and dec_ids.shape == (n, k)
    np.testing.assert_array_equal(dec_ids, ids)
    assert dec_lp.dtype == np.float32 and dec_lp.shape == (n, k)
    assert np.all(dec_lp <= 0)
    assert np.all(np.diff(dec_lp, axis=1) <= 0)

    exact = lp.astype(np.float64)
    err = np.abs(dec_lp.astype(np.float64) - exact)
    bound = enc.abs_error_bounds(lp)
    slack = 2e-7 * (1 + np.abs(exact))  # float32 arithmetic of the decoder
    assert np.all(err <= bound + slack), float(np.max(err - bound))
    stated = enc.max_abs_error()
    if stated is None:
        np.testing.assert_array_equal(dec_lp, lp)
        return
    if enc.values in ("float16", "bfloat16"):
        in_range = exact >= -BOUND_RANGE
    else:
        in_range = exact[:, :1] - exact <= BOUND_RANGE
        in_range &= np.isfinite(bound)
        clipped = ~np.isfinite(bound)
        assert np.all(dec_lp[clipped] >= lp[clipped])  # clipped values decode too high
        if n:
            np.testing.assert_array_equal(dec_lp[:, 0], lp[:, 0])  # top-1 exact
    assert np.all(err[in_range] <= stated + slack[in_range])


@pytest.mark.parametrize("enc", ALL, ids=lambda e: f"{e.ids}-{e.values}")
@settings(max_examples=40, deadline=None)
@given(data=topk())
def test_round_trip(enc: TopkEncoding, data: tuple[np.ndarray, np.ndarray, int]) -> None:
    ids, lp, vocab = data
    if enc.ids == "uint16" and vocab > 1 << 16:
        with pytest.raises(ValueError, match="uint32"):
            enc.columns(ids.shape[1], vocab)
        return
    _check_round_trip(enc, ids, lp, vocab)


@pytest.mark.parametrize("enc", ALL, ids=lambda e: f"{e.ids}-{e.values}")
@pytest.mark.parametrize(("n", "k", "vocab"), [(0, 1, 1), (0, 64, 1 << 20), (1, 1, 1), (1, 5, 9)])
def test_edge_shapes(enc: TopkEncoding, n: int, k: int, vocab: int) -> None:
    if enc.ids == "uint16" and vocab > 1 << 16:
        return  # refused, see test_uint16_refuses_large_vocab_and_names_the_fix
    ids = np.tile(np.arange(vocab - k, vocab)[::-1], (n, 1))
    lp = np.tile(-np.arange(k, dtype=np.float32) / 3, (n, 1))
    _check_round_trip(enc, ids, lp, vocab)


@pytest.mark.parametrize("ids_name", ["uint32", "sorted"])
def test_repeated_ids_round_trip(ids_name: str) -> None:
    """Duplicates are outside the contract, but the id codes stay exact on them."""
    ids = np.array([[3, 3, 0, 3], [0, 0, 0, 0], [5, 1, 5, 1]])
    lp = np.array([[0, -1, -1, -2]] * 3, dtype=np.float32)
    _check_round_trip(TopkEncoding(ids_name, "q8"), ids, lp, 6)


def test_wide_k_uses_wide_lehmer_digits() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(5000, 300, replace=False) for _ in range(4)])
    lp = -np.sort(rng.exponential(2.0, (4, 300)), axis=1).astype(np.float32)
    enc = TopkEncoding("sorted", "q8c")
    assert enc.columns(300, 5000)["topk_id_lehmer"].dtype == "uint16"
    _check_round_trip(enc, ids, lp, 5000)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(0, 6), seed=st.integers(0, 2**32 - 1))
def test_lehmer_inverse(k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    perm = np.array([rng.permutation(k) for _ in range(n)], dtype=np.int64).reshape(n, k)
    digits = lehmer_encode(perm)
    assert np.all(digits < (k - np.arange(k)))  # digit r counts the free slots below: < k - r
    np.testing.assert_array_equal(lehmer_decode(digits), perm)


def test_lehmer_identity_is_all_zero() -> None:
    perm = np.tile(np.arange(70), (3, 1))
    assert not lehmer_encode(perm).any()


def test_corrupt_codes_are_refused() -> None:
    enc = TopkEncoding("sorted", "q8c")
    ids = np.array([[4, 1, 7]])
    parts = enc.encode(ids, np.array([[0.0, -1.0, -2.0]], np.float32), 8)
    bad = dict(parts, topk_id_lehmer=np.array([[0, 2, 0]], np.uint8))  # digit 1 must be < 2
    with pytest.raises(ValueError, match="topk_id_lehmer"):
        enc.decode(bad)
    bad = dict(parts, topk_logprob_codes=np.array([[0, 200, 100]], np.uint8))
    with pytest.raises(ValueError, match="topk_logprob_codes"):
        enc.decode(bad)


def test_uint16_refuses_large_vocab_and_names_the_fix() -> None:
    enc = TopkEncoding("uint16", "float32")
    assert enc.columns(8, 1 << 16)["topk_ids"].dtype == "uint16"
    with pytest.raises(ValueError, match="ids='uint32'"):
        enc.columns(8, (1 << 16) + 1)


def test_ids_outside_the_vocabulary_are_refused() -> None:
    enc = TopkEncoding("sorted", "q8")
    lp = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        enc.encode(np.array([[3, 10]]), lp, 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        enc.encode(np.array([[-1, 3]]), lp, 10)
    with pytest.raises(ValueError, match="both be"):
        enc.encode(np.zeros((2, 3), int), np.zeros((2, 2), np.float32), 10)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid names: uint16, uint32, sorted"):
        TopkEncoding("varint", "q8")
    with pytest.raises(ValueError, match="q8c"):
        TopkEncoding("uint32", "int4")
    with pytest.raises(ValueError, match="valid names"):
        TopkEncoding.from_json({"ids": "uint32", "values": "fp8"})
    with pytest.raises(ValueError, match="'ids'"):
        TopkEncoding.from_json({"ids": "uint32"})


@pytest.mark.parametrize("enc", ALL, ids=lambda e: f"{e.ids}-{e.values}")
def test_json_round_trip_and_stated_bound(enc: TopkEncoding) -> None:
    assert TopkEncoding.from_json(enc.to_json()) == enc
    assert enc.error_bound()
    bound = enc.max_abs_error()
    assert (bound is None) == (enc.values == "float32")
    assert bound is None or (math.isfinite(bound) and bound > 0)


@pytest.mark.parametrize("vocab", [2, 8192, 1 << 16, (1 << 16) + 1, 128256, 1 << 20])
def test_default_encoding_fits_the_vocabulary(vocab: int) -> None:
    enc = default_encoding(vocab)
    rng = np.random.default_rng(vocab)
    k = min(vocab, 64)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(5)])
    lp = -np.sort(rng.exponential(1.0, (5, k)), axis=1).astype(np.float32)
    _check_round_trip(enc, ids, lp, vocab)


def test_schemas_encodings_imports_no_torch() -> None:
    code = "import sys, schemas.encodings; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
