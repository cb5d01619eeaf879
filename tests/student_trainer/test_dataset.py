"""`ShardStream`: every sequence once per epoch, in an order fixed by the seed, partitioned over
DDP ranks and DataLoader workers, in memory that does not grow with the cache, on any fsspec URL.

Caches here are written directly through `schemas.CacheWriter` with synthetic records whose first
two input ids spell a sequence number, so a test can tell every sequence apart.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections import Counter

import fsspec
import numpy as np
import pytest
from torch.utils.data import DataLoader

from schemas.cache import CacheWriter, open_cache
from schemas.encodings import default_encoding
from schemas.errors import ConfigError
from schemas.manifest import BuildSettings, DatasetInfo, Manifest, TeacherInfo, TokenizerInfo
from schemas.record import Layout, ShardRecords
from student_trainer import TrainConfig
from student_trainer.dataset import Sequence, ShardStream, batches, worker_seed

V = 1024
"""Vocabulary of the synthetic caches: sequence ids go up to V * V."""


def draft(fmt: str = "arrow", k: int = 8, vocab: int = V) -> Manifest:
    return Manifest(
        format=fmt,
        teacher=TeacherInfo(name_or_path="teacher", weights_sha256="sha256:w"),
        tokenizer=TokenizerInfo(name_or_path="tok", fingerprint="sha256:t", vocab_size=vocab),
        dataset=DatasetInfo(
            source="synthetic", fingerprint="sha256:d", num_documents=1, num_tokens=1
        ),
        build=BuildSettings(top_k=k, max_length=4096),
        layout=Layout(k=k, vocab_size=vocab),
        encoding=default_encoding(vocab).to_json(),
    )


def synthetic_records(layout: Layout, lengths: list[int], first_id: int, seed: int) -> ShardRecords:
    """Records of sequences `lengths` numbered from `first_id`: a sequence's first two input ids
    are its number in base V (a one-token sequence keeps only the high digit).

    Cheap (no dense [N, V] logits): top-k log-probs come from a Dirichlet draw, sorted.
    """
    rng = np.random.default_rng(seed)
    n, k = sum(lengths), layout.k
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids = rng.integers(0, V, n).astype(np.int32)
    numbers = first_id + np.arange(len(lengths))
    input_ids[offsets[:-1]] = numbers // V
    two = np.array(lengths) >= 2
    input_ids[offsets[:-1][two] + 1] = (numbers % V)[two]
    p = rng.dirichlet(np.full(k + 1, 0.5), size=n)
    top = -np.sort(-p[:, :k], axis=1)
    label_lp = np.log(rng.uniform(1e-3, 1.0, n)).astype(np.float32)
    label_lp[offsets[1:] - 1] = np.nan
    return ShardRecords(
        input_ids=input_ids,
        topk_ids=((rng.integers(0, V, (n, 1)) + np.arange(k)) % V).astype(np.int32),
        topk_logprobs=np.log(top).astype(np.float32),
        lse=rng.normal(5.0, 1.0, n).astype(np.float32),
        log_tail=np.log(p[:, k]).astype(np.float32),
        label_logprob=label_lp,
        source_row=numbers.astype(np.int64),
        source_start=np.zeros(len(lengths), dtype=np.int64),
        seq_offsets=offsets,
    )


def write_cache(
    url: str,
    shard_lengths: list[list[int]],
    fmt: str = "arrow",
    k: int = 8,
    storage_options: dict | None = None,
) -> int:
    """A complete cache at `url` whose shard i holds sequences of `shard_lengths[i]` tokens.

    Sequences are numbered 0, 1, ... in shard order; returns how many there are.
    """
    writer = CacheWriter(url, draft(fmt, k), **(storage_options or {}))
    number = 0
    for i, lengths in enumerate(shard_lengths):
        with writer.shard_writer(i) as w:
            w.write(synthetic_records(writer.draft.layout, lengths, number, seed=i))
            writer.commit_shard(w)
        number += len(lengths)
    writer.finalize(len(shard_lengths))
    return number


def seq_id(seq: Sequence) -> int:
    ids = seq.arrays["input_ids"]
    return int(ids[0]) * V + int(ids[1])


def order(stream: ShardStream | DataLoader) -> list[int]:
    return [seq_id(s) for s in stream]


SHARDS = [[3 + (i * 7 + j * 5) % 40 for j in range(3 + i % 5)] for i in range(12)]
"""12 shards of 3 to 7 sequences of 3 to 42 tokens: 57 sequences."""
NUM_SEQUENCES = sum(len(s) for s in SHARDS)


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp(request.param) / "cache")
    assert write_cache(url, SHARDS, fmt=request.param) == NUM_SEQUENCES
    return url


def shard_of(number: int) -> int:
    bounds = np.cumsum([len(s) for s in SHARDS])
    return int(np.searchsorted(bounds, number, side="right"))


def test_one_epoch_yields_every_sequence_exactly_once(cache: str) -> None:
    for epoch in range(2):
        stream = ShardStream(cache, seed=5, buffer_sequences=7)
        stream.epoch = epoch
        got = Counter(order(stream))
        assert got == Counter(range(NUM_SEQUENCES))


def test_order_is_fixed_by_seed_and_epoch_and_shuffled(cache: str) -> None:
    def run(seed: int, epoch: int = 0, buffer: int = 7) -> list[int]:
        stream = ShardStream(cache, seed=seed, buffer_sequences=buffer)
        stream.epoch = epoch
        return order(stream)

    first = run(seed=0)
    assert run(seed=0) == first, "same seed and epoch, same order"
    assert run(seed=1) != first, "another seed, another order"
    assert run(seed=0, epoch=1) != first, "every epoch reshuffles"
    assert first != sorted(first), "shuffled, not the stored order"
    assert order(ShardStream(cache, shuffle=False)) == list(range(NUM_SEQUENCES))

    # Buffer 0: shards permuted, each one's sequences together and in stored order.
    shard_only = run(seed=0, buffer=0)
    runs = [shard_of(n) for n in shard_only]
    blocks = [s for i, s in enumerate(runs) if i == 0 or runs[i - 1] != s]
    assert sorted(blocks) == list(range(len(SHARDS))), "each shard read as one block"
    assert blocks != sorted(blocks), "shards permuted"
    assert all(b - a == 1 for a, b in itertools.pairwise(shard_only) if shard_of(a) == shard_of(b))

    # With a buffer, sequences of different shards mix and leave their stored order.
    mixed = [shard_of(n) for n in first]
    switches = sum(a != b for a, b in itertools.pairwise(mixed))
    assert switches > len(SHARDS), "the buffer interleaves shards"


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_and_workers_partition_the_epoch(cache: str, world_size: int) -> None:
    per_rank = []
    for rank in range(world_size):
        stream = ShardStream(cache, seed=3, buffer_sequences=5, rank=rank, world_size=world_size)
        loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=worker_seed)
        ids = order(loader)
        assert ids, f"rank {rank} of {world_size} got nothing"
        assert order(loader) == ids, "a rank's stream is deterministic across worker processes"
        per_rank.append(ids)
    everything = Counter(n for ids in per_rank for n in ids)
    assert everything == Counter(range(NUM_SEQUENCES)), "nothing lost, nothing twice"
    shards = [{shard_of(n) for n in ids} for ids in per_rank]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not shards[a] & shards[b], "ranks read disjoint shards"


def test_workers_lose_nothing_in_one_process(cache: str) -> None:
    stream = ShardStream(cache, seed=3, buffer_sequences=5)
    loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=worker_seed)
    assert Counter(order(loader)) == Counter(range(NUM_SEQUENCES))


def test_ranks_read_the_micro_batches_of_gradient_accumulation(tmp_path) -> None:
    """The documented rule that makes DDP equal gradient accumulation: one shard = one
    micro-batch, buffer 0, shards a multiple of W. Rank r's micro-batch a of step s is the single
    process's micro-batch at slot r + W * a of step s, epoch after epoch."""
    url = str(tmp_path / "c")
    write_cache(url, [[20, 12]] * 12)  # 32 tokens a shard
    world, accum = 2, 3

    def micro_batches(rank: int, world_size: int, epochs: int = 2) -> list[list[int]]:
        stream = ShardStream(url, seed=9, buffer_sequences=0, rank=rank, world_size=world_size)
        out = []
        for epoch in range(epochs):
            stream.epoch = epoch
            out += [[seq_id(s) for s in group] for group in batches(iter(stream), 32)]
        return out

    single = micro_batches(0, 1)  # one process, accumulation world * accum
    ranks = [micro_batches(r, world) for r in range(world)]
    steps = len(single) // (world * accum)
    assert steps == 4 and all(len(r) == steps * accum for r in ranks)
    for s in range(steps):
        for r in range(world):
            for a in range(accum):
                assert ranks[r][s * accum + a] == single[s * world * accum + r + world * a]


def test_memory_stays_flat_as_the_cache_grows(tmp_path) -> None:
    """Streaming 16 shards through a buffer of 1.5 shards: the traced peak after the last shard is
    within one shard of the peak after the third, while holding every sequence (what a loader
    that kept the cache would do) grows by most of the cache.

    Zarr shards decode into numpy arrays, which tracemalloc sees."""
    url = str(tmp_path / "c")
    shards, per_shard = 16, 8
    write_cache(url, [[512] * per_shard] * shards, fmt="zarr", k=32)
    one_shard = sum(v.nbytes for _, v in open_cache(url).read_shard(0).arrays())

    def peaks(keep: bool) -> tuple[int, int]:
        """(peak after 3 shards' sequences, peak at the end of the epoch)."""
        held, early = [], 0
        tracemalloc.start()
        try:
            for i, seq in enumerate(ShardStream(url, seed=0, buffer_sequences=12)):
                if keep:
                    held.append(seq)
                if i + 1 == 3 * per_shard:
                    early = tracemalloc.get_traced_memory()[1]
            return early, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    early, end = peaks(keep=False)
    assert end - early < one_shard, (
        f"the peak grew {(end - early) / 1e6:.2f} MB from shard 3 to shard {shards} "
        f"(one shard is {one_shard / 1e6:.2f} MB): memory grows with the cache"
    )
    early, end = peaks(keep=True)
    assert end - early > (shards - 5) * one_shard, "the measurement sees a loader holding the cache"


def test_memory_url_streams_like_a_local_path(tmp_path) -> None:
    local = str(tmp_path / "c")
    write_cache(local, SHARDS)
    remote = "memory://kdcache-test/stream"
    fs = fsspec.filesystem("memory")
    fs.put(local, remote.removeprefix("memory://"), recursive=True)
    try:
        assert order(ShardStream(remote, seed=4, buffer_sequences=6)) == order(
            ShardStream(local, seed=4, buffer_sequences=6)
        )
        stream = ShardStream(remote, seed=4, buffer_sequences=6, rank=1, world_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=worker_seed)
        assert order(loader) == order(
            DataLoader(
                replace_url(stream, local),
                batch_size=None,
                num_workers=2,
                worker_init_fn=worker_seed,
            )
        )
    finally:
        fs.rm(remote.removeprefix("memory://"), recursive=True)


def replace_url(stream: ShardStream, url: str) -> ShardStream:
    return ShardStream(
        url,
        seed=stream.seed,
        buffer_sequences=stream.buffer_sequences,
        rank=stream.rank,
        world_size=stream.world_size,
    )


def test_shuffle_buffer_and_workers_must_not_be_negative(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--shuffle-buffer"):
        TrainConfig(cache="c", out=str(tmp_path), shuffle_buffer=-1)
    with pytest.raises(ConfigError, match="--num-workers"):
        TrainConfig(cache="c", out=str(tmp_path), num_workers=-1)


def test_a_one_token_sequence_is_the_only_one_left_out(tmp_path) -> None:
    url = str(tmp_path / "c")
    write_cache(url, [[4, 1, 5], [2]])  # sequence 1 has no next token to learn
    assert sorted(order(ShardStream(url, buffer_sequences=3))) == [0, 2, 3]
