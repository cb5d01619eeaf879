"""The conformance suite every shard backend passes, and strategies for random records.

A backend's tests are one subclass:

    class TestArrowBackend(ShardBackendTests):
        format = "arrow"

so a third backend gets every guarantee the first two have (the pattern of zarr-python's
`StoreTests`). Needs pytest and hypothesis, which only tests import.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import _columns
from schemas.cache import BACKENDS
from schemas.encodings import TopkEncoding
from schemas.errors import CacheCorruptError, CacheNotFoundError
from schemas.record import Layout, ShardRecords
from schemas.storage import resolve

LOSSLESS = TopkEncoding(ids="uint32", values="float32")


def random_records(
    layout: Layout, lengths: list[int], seed: int, *, special_values: bool = True
) -> ShardRecords:
    """Records for sequences of `lengths` tokens that satisfy every invariant of the format.

    With `special_values`, the edge cases a writer must keep bit for bit show up: -inf tails
    (k = V), NaN labels at sequence ends, -0.0 and exact 0.0 top-1 log-probabilities.
    """
    rng = np.random.default_rng(seed)
    n, k, v = sum(lengths), layout.k, layout.vocab_size
    logits = rng.standard_normal((n, v)) * rng.uniform(0.5, 4.0)
    hot = (rng.random(n) < 0.2) if special_values else np.zeros(n, dtype=bool)
    logits[hot, 0] = 50.0  # near-one-hot rows: top-1 log-prob rounds to 0
    lse = np.logaddexp.reduce(logits, axis=1)
    logp = logits - lse[:, None]
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    top = np.minimum(np.take_along_axis(logp, order, axis=1), 0.0).astype(np.float32)
    rest = logp.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    log_tail = np.logaddexp.reduce(rest, axis=1) if k < v else np.full(n, -np.inf)
    if k == 0:  # samples only: the tail is everything, exactly
        log_tail = np.zeros(n)
    input_ids = rng.integers(0, v, n)
    labels = np.roll(input_ids, -1)  # the next input id (none at a sequence's last position)
    label_lp = logp[np.arange(n), labels].astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    label_lp[offsets[1:][np.array(lengths) > 0] - 1] = np.nan
    if special_values and n and k:  # only where the top-1 is ~0 already: values stay consistent
        top[hot & (rng.random(n) < 0.5), 0] = -0.0
    arrays: dict[str, Any] = dict(
        input_ids=input_ids.astype(np.int32),
        topk_ids=order.astype(np.int32),
        topk_logprobs=top,
        lse=lse.astype(np.float32),
        log_tail=log_tail.astype(np.float32),
        label_logprob=label_lp,
        source_row=rng.integers(0, 10**6, len(lengths)).astype(np.int64),
        source_start=rng.integers(0, 4096, len(lengths)).astype(np.int64),
        seq_offsets=offsets,
    )
    if layout.content_keys:
        arrays["document_hash"] = rng.integers(0, 2**64, len(lengths), dtype=np.uint64)
    if layout.temperatures:
        arrays["temp_lse"] = (
            np.stack([np.logaddexp.reduce(logits / t, axis=1) for t in layout.temperatures], axis=1)
            .astype(np.float32)
            .reshape(n, len(layout.temperatures))
        )
    if layout.num_samples and layout.compact_samples:
        arrays.update(_compact_samples(rng, logp, order, top, layout.num_samples))
    elif layout.num_samples:
        s = layout.num_samples
        m = min(s - s // 2, v)  # distinct ids drawn; the other slots are padding
        ids = np.sort(np.argsort(rng.random((n, v)), axis=1)[:, :m], axis=1)
        ids = np.concatenate([ids, np.repeat(ids[:, :1], s - m, axis=1)], axis=1)
        counts = np.zeros((n, s), dtype=np.uint16)  # padding: count 0, repeats the first id
        counts[:, :m] = 1
        counts[:, 0] += s - m  # the s draws add up
        arrays["sample_ids"] = ids.astype(np.int32)
        arrays["sample_counts"] = counts
        arrays["sample_logprobs"] = np.take_along_axis(logp, ids, axis=1).astype(np.float32)
    return ShardRecords(**arrays)


def _compact_samples(
    rng: np.random.Generator, logp: np.ndarray, order: np.ndarray, top: np.ndarray, s: int
) -> dict[str, np.ndarray]:
    """Format 3.0 samples: distinct ids outside the top-k by descending log-prob, counts adding
    up to at most s (all s without a top-k), padding repeating the last (or the k-th top-k)."""
    n, v = logp.shape
    k = order.shape[1]
    m = min(s - s // 2, v - k)  # distinct ids drawn outside the top-k
    keys = rng.random((n, v))
    np.put_along_axis(keys, order, np.inf, axis=1)  # top-k ids sort last: never drawn
    ids = np.argsort(keys, axis=1)[:, :m]
    by_value = np.argsort(-np.take_along_axis(logp, ids, axis=1), axis=1, kind="stable")
    ids = np.take_along_axis(ids, by_value, axis=1)
    counts = np.zeros((n, s), dtype=np.uint16)
    counts[:, :m] = 1
    if m:  # the rest of the draws: all on the first id without a top-k, else some in it
        counts[:, 0] += s - m if k == 0 else rng.integers(0, s - m + 1, n).astype(np.uint16)
    values = np.take_along_axis(logp, ids, axis=1)
    fill_i = ids[:, -1:] if m else order[:, -1:]
    fill_v = values[:, -1:] if m else top[:, -1:]
    return {
        "sample_ids": np.concatenate([ids, np.repeat(fill_i, s - m, 1)], 1).astype(np.int32),
        "sample_counts": counts,
        "sample_logprobs": np.concatenate([values, np.repeat(fill_v, s - m, 1)], 1).astype(
            np.float32
        ),
    }


@st.composite
def layouts_and_lengths(draw: st.DrawFn) -> tuple[Layout, list[int], int]:
    """Random layouts (k up to the whole vocabulary, optional extras, compact samples and
    samples-only caches) and sequence lengths, empty and one-token sequences included."""
    vocab = draw(st.sampled_from([2, 7, 64, 300, 70_000]))
    k = draw(st.integers(1, min(vocab, 16)))
    if draw(st.booleans()) and vocab <= 64:
        k = vocab
    temperatures = tuple(draw(st.lists(st.sampled_from([0.5, 2.0, 4.0]), max_size=2, unique=True)))
    samples = draw(st.sampled_from([0, 0, 3, 8]))
    lengths = draw(st.lists(st.integers(0, 12) | st.just(1), min_size=0, max_size=5))
    if vocab > 1000:  # keep dense reference logits small
        lengths = lengths[:2]
    keys = draw(st.booleans())
    compact = bool(samples) and draw(st.booleans())  # format 3.0 samples
    if compact and draw(st.booleans()):
        k = 0  # samples only
    return (
        Layout(
            k=k,
            vocab_size=vocab,
            temperatures=temperatures,
            num_samples=samples,
            content_keys=keys,
            compact_samples=compact,
        ),
        lengths,
        draw(st.integers(0, 2**31)),
    )


def stored(records: ShardRecords, layout: Layout, encoding: TopkEncoding) -> ShardRecords:
    """What a reader must hand back for `records`: their encoded columns, decoded.

    Equal to `records` for a lossless encoding; within the encoding's error bound otherwise.
    """
    return _columns.from_stored(_columns.to_stored(records, layout, encoding), layout, encoding)


class ShardBackendTests:
    """Subclass with `format = "<name in schemas.cache.BACKENDS>"`."""

    format: ClassVar[str]
    encoding: ClassVar[TopkEncoding] = LOSSLESS
    identity: ClassVar[dict[str, Any]] = {
        "format_version": "1.0",
        "cache_fingerprint": "sha256:test",
    }

    def _write(self, url: str, layout: Layout, batches: list[ShardRecords], index: int = 0) -> Any:
        fs, root = resolve(url)
        writer = BACKENDS[self.format].writer(fs, root, index, layout, self.encoding, self.identity)
        with writer as w:
            for batch in batches:
                w.write(batch)
            return w.finalize()

    def _reader(self, url: str, layout: Layout, info: Any, verify: bool = True) -> Any:
        fs, root = resolve(url)
        return BACKENDS[self.format].reader(fs, root, info, layout, self.encoding, verify=verify)

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    @given(case=layouts_and_lengths(), split=st.integers(0, 5))
    def test_round_trip_bit_for_bit(
        self, tmp_path_factory: pytest.TempPathFactory, case: Any, split: int
    ) -> None:
        layout, lengths, seed = case
        records = random_records(layout, lengths, seed)
        url = str(tmp_path_factory.mktemp(self.format))
        batches = [
            records.sequences(0, min(split, len(lengths))),
            records.sequences(min(split, len(lengths)), len(lengths)),
        ]
        info = self._write(url, layout, batches)
        back = self._reader(url, layout, info).read()
        assert back.equals(stored(records, layout, self.encoding))
        assert (info.num_tokens, info.num_sequences) == (records.num_tokens, records.num_sequences)

    def test_read_sequences_is_a_slice(self, tmp_path: Any) -> None:
        layout = Layout(k=4, vocab_size=50, temperatures=(2.0,), num_samples=4)
        records = random_records(layout, [3, 0, 1, 7, 5], seed=1)
        info = self._write(str(tmp_path), layout, [records])
        reader = self._reader(str(tmp_path), layout, info)
        assert reader.read_sequences(1, 4).equals(
            stored(records, layout, self.encoding).sequences(1, 4)
        )

    def test_identity_travels_with_the_shard(self, tmp_path: Any) -> None:
        layout = Layout(k=2, vocab_size=10)
        info = self._write(str(tmp_path), layout, [random_records(layout, [2], 0)], index=7)
        identity = self._reader(str(tmp_path), layout, info).identity()
        assert identity["cache_fingerprint"] == "sha256:test" and identity["shard_index"] == 7
        assert info.name.endswith(f"000007{BACKENDS[self.format].writer.suffix}")

    def test_failed_write_leaves_nothing(self, tmp_path: Any) -> None:
        layout = Layout(k=2, vocab_size=10)
        fs, root = resolve(str(tmp_path))
        writer = BACKENDS[self.format].writer(fs, root, 0, layout, self.encoding, self.identity)
        with pytest.raises(RuntimeError), writer as w:
            w.write(random_records(layout, [3], 0))
            raise RuntimeError("crash mid-shard")
        assert not fs.exists(f"{root}/shards")
        assert fs.ls(f"{root}/staging", detail=False) == []

    def test_unfinished_shards_stay_out_of_shards_folder(self, tmp_path: Any) -> None:
        """A glob over shards/ sees committed-to-be shards only once they are finished."""
        layout = Layout(k=2, vocab_size=10)
        fs, root = resolve(str(tmp_path))
        writer = BACKENDS[self.format].writer(fs, root, 0, layout, self.encoding, self.identity)
        with writer as w:
            w.write(random_records(layout, [3], 0))
            assert not fs.exists(f"{root}/shards") or fs.ls(f"{root}/shards") == []
            info = w.finalize()
        assert fs.ls(f"{root}/staging", detail=False) == []
        assert fs.exists(f"{root}/{info.name}")

    def test_wrong_shapes_are_refused(self, tmp_path: Any) -> None:
        layout = Layout(k=3, vocab_size=10)
        other = random_records(Layout(k=2, vocab_size=10), [4], 0)
        fs, root = resolve(str(tmp_path))
        writer = BACKENDS[self.format].writer(fs, root, 0, layout, self.encoding, self.identity)
        with writer as w, pytest.raises(ValueError, match="topk_ids"):
            w.write(other)

    def _damage_cases(self, tmp_path: Any) -> tuple[Layout, Any, Any]:
        layout = Layout(k=4, vocab_size=100)
        info = self._write(str(tmp_path), layout, [random_records(layout, [20, 30], 3)])
        fs, _ = resolve(str(tmp_path))
        return layout, info, fs

    def _largest_file(self, fs: Any, path: str) -> str:
        files = fs.find(path) or [path]
        return max(files, key=lambda f: fs.size(f))

    def test_flipped_byte_is_caught(self, tmp_path: Any) -> None:
        layout, info, fs = self._damage_cases(tmp_path)
        target = self._largest_file(fs, f"{tmp_path}/{info.name}")
        data = bytearray(fs.cat_file(target))
        data[len(data) // 2] ^= 0x40
        fs.pipe_file(target, bytes(data))
        with pytest.raises(CacheCorruptError, match=info.name):
            self._reader(str(tmp_path), layout, info)

    def test_truncation_is_caught(self, tmp_path: Any) -> None:
        layout, info, fs = self._damage_cases(tmp_path)
        target = self._largest_file(fs, f"{tmp_path}/{info.name}")
        fs.pipe_file(target, fs.cat_file(target)[:-7])
        with pytest.raises(CacheCorruptError, match=info.name):
            self._reader(str(tmp_path), layout, info)

    def test_missing_shard_is_caught(self, tmp_path: Any) -> None:
        layout, info, fs = self._damage_cases(tmp_path)
        fs.rm(f"{tmp_path}/{info.name}", recursive=True)
        with pytest.raises(CacheNotFoundError, match=info.name):
            self._reader(str(tmp_path), layout, info)

    def test_garbage_without_verify_is_a_clear_error(self, tmp_path: Any) -> None:
        layout, info, fs = self._damage_cases(tmp_path)
        target = self._largest_file(fs, f"{tmp_path}/{info.name}")
        fs.pipe_file(target, b"\x00garbage" * 5)
        with pytest.raises(CacheCorruptError, match=info.name):
            self._reader(str(tmp_path), layout, info, verify=False).read()
