"""Lehmer codes of per-row permutations, vectorised over rows (numpy only).

A row's permutation `perm` (k,) maps rank r to a slot `perm[r]` (here: the position of the
rank-r id in the row's ascending id order). Its Lehmer code is `digit[r]` = the number of
slots still free below `perm[r]` once ranks 0..r-1 have taken theirs, so digit[r] < k - r.
The digits take log2(k!) bits at best for a uniformly random order (about 5.6 bits per rank
at k = 128, against 7 for the slots themselves) and less when ranks follow slot order.

Both directions take one step per rank on all rows at once. Each row keeps its free slots as a
bitmask of ceil(k / 8) bytes and the running count of free slots up to each byte; counting the
free slots below a slot and finding the d-th free slot are then a gather and two table lookups.
That is O(k^2 / 8) numpy calls, each on a contiguous length-N array.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lehmer_decode", "lehmer_encode"]

_POPCOUNT8 = np.bitwise_count(np.arange(256, dtype=np.uint8)).astype(np.int16)
_SELECT8 = np.array(
    [[[b for b in range(8) if v >> b & 1][d] if d < _POPCOUNT8[v] else 0 for d in range(8)]
     for v in range(256)],
    dtype=np.int16,
)  # fmt: skip
"""_SELECT8[v, d]: the index of the d-th set bit of the byte v."""
_BIT = (1 << np.arange(8)).astype(np.uint8)


def _start(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All slots free: bitmask bytes (ceil(k/8), N) and the free counts up to each byte."""
    nbytes = (k + 7) // 8
    bits = np.clip(k - 8 * np.arange(nbytes), 0, 8)
    free = np.repeat(((1 << bits) - 1).astype(np.uint8)[:, None], n, axis=1)
    return free, np.cumsum(_POPCOUNT8[free], axis=0, dtype=np.int16)


# Both loops keep the per-row state transposed, (bytes, N), so that every step works on
# contiguous length-N rows; a row's byte j is at flat index j * N + row.


def lehmer_encode(perm: np.ndarray) -> np.ndarray:
    """Lehmer digits (N, k) of `perm` (N, k), each row a permutation of 0..k-1.

    Digits are uint8 for k <= 256, else uint16.
    """
    perm = np.asarray(perm, dtype=np.int64)
    n, k = perm.shape
    digits = np.empty((k, n), dtype=np.uint8 if k <= 256 else np.uint16)
    if n == 0:
        return digits.T
    free, cum = _start(n, k)
    flat_free, flat_cum = free.reshape(-1), cum.reshape(-1)
    rows = np.arange(n)
    slots = np.ascontiguousarray(perm.T)  # (k, N)
    for r in range(k):
        j, bit = slots[r] >> 3, slots[r] & 7
        at = j * n + rows
        byte = flat_free[at]
        before = np.where(j > 0, flat_cum[np.maximum(j - 1, 0) * n + rows], 0)  # bytes < j
        digits[r] = before + _POPCOUNT8[byte & (_BIT[bit] - 1)]
        flat_free[at] = byte & ~_BIT[bit]
        for b in range(cum.shape[0]):
            cum[b] -= j <= b
    return np.ascontiguousarray(digits.T)


def lehmer_decode(digits: np.ndarray) -> np.ndarray:
    """The permutations (N, k) int64 whose Lehmer digits are `digits` (N, k)."""
    digits = np.asarray(digits)
    n, k = digits.shape
    perm = np.empty((k, n), dtype=np.int64)
    if n == 0:
        return perm.T
    free, cum = _start(n, k)
    flat_free, flat_cum = free.reshape(-1), cum.reshape(-1)
    rows = np.arange(n)
    wanted = np.ascontiguousarray(digits.T).astype(np.int16)  # (k, N)
    for r in range(k):
        want = wanted[r]  # 0-based index among the free slots
        j = np.zeros(n, dtype=np.int64)  # the byte holding that free slot
        for b in range(cum.shape[0] - 1):
            j += cum[b] <= want
        before = np.where(j > 0, flat_cum[np.maximum(j - 1, 0) * n + rows], 0)
        at = j * n + rows
        byte = flat_free[at]
        bit = _SELECT8[byte, want - before]
        perm[r] = 8 * j + bit
        flat_free[at] = byte & ~_BIT[bit]
        for b in range(cum.shape[0]):
            cum[b] -= j <= b
    return np.ascontiguousarray(perm.T)
