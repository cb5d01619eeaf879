"""Shards -> sequences, streamed: shuffled, deterministic, split across ranks and workers.

Order of one epoch, all from `seed + epoch`:
1. the shard list is permuted (the same permutation on every rank and worker);
2. shards are dealt round-robin to the (rank, DataLoader worker) slots: slot
   `rank * num_workers + worker` of `world_size * num_workers` reads permuted shards
   `slot, slot + slots, ...`, so the slots partition the epoch: every sequence once, nowhere twice;
3. each slot reads its shards one at a time and passes their sequences through a shuffle
   buffer of `buffer_sequences` (0 or 1: no mixing, each shard's sequences in stored order).
Memory holds one shard's records plus the buffer, whatever the size of the cache: a sequence
entering the buffer is copied out of its shard, so the buffer never pins whole past shards.

Data parallel equals gradient accumulation when every shard is one micro-batch. With W ranks
(no DataLoader workers) rank r reads permuted shards r, r + W, r + 2W, ...; a single process
with W times the accumulation reads them all in order. When each shard fills exactly one
micro-batch, `buffer_sequences <= 1` and the shard count is a multiple of W, optimizer step s
sees the same micro-batches either way: rank r's a-th micro-batch of a step is the single
process's micro-batch at accumulation slot r + W * a of that step. Otherwise ranks read other
(equally shuffled) sequences than one process would: the runs agree in distribution, not exactly.

A shard is checked before any of it is used: its size and checksum against the manifest, its
own metadata against the cache (`Cache.reader`), and its decoded records against the format's
invariants (`schemas.checks.check_records`: ids inside the vocabulary, log-probs <= 0 and not
NaN, finite log-sum-exps, labels NaN only at a sequence's end, sample counts, offsets, counts),
since a checksum matches a bad shard as well as a good one when its manifest entry was forged
or its producer was wrong. The content check costs a few reductions per array, little next to
decoding. A bad shard stops the stream with the shard and its first problem named, or is
counted and skipped with `skip_bad_shards` (a DataLoader worker yields a `SkippedShard` for it,
since its own count dies with it; `note_skipped` takes those out of the stream in the main
process and counts them there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from schemas.cache import Cache, open_cache
from schemas.checks import check_records
from schemas.errors import CacheCorruptError, CacheNotFoundError
from schemas.record import ShardRecords
from schemas.storage import shown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sequence:
    """One cached sequence: its per-token records, as numpy arrays of length n."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.arrays["input_ids"].shape[0])

    def copy(self) -> Sequence:
        """The same sequence in arrays of its own (not views into a shard's arrays)."""
        return Sequence({name: v.copy() for name, v in self.arrays.items()})


@dataclass(frozen=True)
class SkippedShard:
    """What a DataLoader worker yields in place of a shard it skipped."""

    name: str


def note_skipped(
    items: Iterator[Sequence | SkippedShard], stream: ShardStream
) -> Iterator[Sequence]:
    """`items` (a DataLoader over `stream`) without the workers' `SkippedShard` marks, each
    added to `stream.bad_shards` in this process."""
    for item in items:
        if isinstance(item, SkippedShard):
            if item.name not in stream.bad_shards:
                stream.bad_shards.append(item.name)
            continue
        yield item


class ShardStream(IterableDataset):
    """Sequences of a cache for one epoch. Set `epoch` before each pass."""

    def __init__(
        self,
        url: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        buffer_sequences: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        skip_bad_shards: bool = False,
        storage_options: dict | None = None,
        batch_tokens: int | None = None,
    ) -> None:
        self.url, self.seed, self.shuffle = url, seed, shuffle
        self.batch_tokens = batch_tokens
        """Yield micro-batches (lists of sequences) of about this many tokens; None: sequences."""
        self._yielded = 0  # items handed out in this pass (sequences or micro-batches)
        self._skip = 0  # items to pass over at the start of the next pass (a resume)
        self.buffer_sequences = buffer_sequences
        self.rank, self.world_size = rank, world_size
        self.skip_bad_shards = skip_bad_shards
        self.storage_options = storage_options or {}
        self.epoch = 0
        self.bad_shards: list[str] = []

    def cache(self) -> Cache:
        return open_cache(self.url, require_complete=True, **self.storage_options)

    def shard_order(self, cache: Cache) -> list[int]:
        """This slot's shards for the current epoch, in reading order."""
        order = np.arange(len(cache.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        worker = get_worker_info()
        workers, wid = (worker.num_workers, worker.id) if worker else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + wid
        return [int(i) for i in order[slot::slots]]

    def set_epoch(self, epoch: int) -> None:
        """What Hugging Face Trainer calls before each epoch (as `self.epoch = epoch`)."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where this pass stands, as counted in the process that iterates this object.

        With DataLoader workers each worker holds its own copy, so resume by replaying the
        loader's batches instead (as Hugging Face Trainer does); the stream is deterministic.
        """
        return {"seed": self.seed, "epoch": self.epoch, "position": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next pass starts at `state`'s epoch, after its first `position` items."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the state is of seed {state['seed']}, this dataset's is {self.seed}")
        self.epoch, self._skip = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[Sequence | list[Sequence] | SkippedShard]:
        items = self._epoch()
        if self.batch_tokens:
            items = _grouped(items, self.batch_tokens)
        skip, self._skip, self._yielded = self._skip, 0, 0
        for item in items:
            if not isinstance(item, SkippedShard):
                self._yielded += 1
                if self._yielded <= skip:
                    continue
            yield item

    def _epoch(self) -> Iterator[Sequence | SkippedShard]:
        cache = self.cache()
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker.id if worker else 0])
        buffer: list[Sequence] = []
        for index in self.shard_order(cache):
            records = self._read(cache, index)
            if records is None:
                if worker is not None:  # the main process counts what a worker skipped
                    yield SkippedShard(cache.shards[index].name)
                continue
            for seq in _sequences(records):
                if not self.shuffle or self.buffer_sequences <= 1:
                    yield seq
                    continue
                seq = seq.copy()  # a view would keep its whole shard alive while buffered
                if len(buffer) < self.buffer_sequences:
                    buffer.append(seq)
                    continue
                pick = int(rng.integers(len(buffer)))
                yield buffer[pick]
                buffer[pick] = seq
        if buffer:
            for pick in rng.permutation(len(buffer)):
                yield buffer[int(pick)]

    def _read(self, cache: Cache, index: int) -> ShardRecords | None:
        """Shard `index`, checked; None when it is bad and `skip_bad_shards` is set."""
        info = cache.shards[index]
        try:
            return checked_shard(cache, index)
        except (CacheCorruptError, CacheNotFoundError) as exc:
            if not self.skip_bad_shards:
                raise type(exc)(
                    exc.message,
                    hint=(f"{exc.hint}; or " if exc.hint else "")
                    + "pass --skip-bad-shards to train on without it",
                ) from None
            if info.name not in self.bad_shards:  # each epoch meets it again
                self.bad_shards.append(info.name)
                log.warning("kdcache: skipping %s: %s", info.name, exc.message)
            return None


def checked_shard(cache: Cache, index: int) -> ShardRecords:
    """The records of shard `index`, after the content checks of `schemas.checks`.

    Raises `CacheCorruptError` naming the shard and its first problem when they fail (and
    whatever `Cache.read_shard` raises for bytes, checksums and metadata).
    """
    info = cache.shards[index]
    records = cache.read_shard(info)
    problems = check_records(records, cache.layout, info)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CacheCorruptError(
            f"shard {info.name} of {shown(cache.url)} holds bad records: {problems[0]}{more}",
            hint=f"run `kdcache validate --deep {shown(cache.url)}` to list every problem, then "
            "rebuild the shard (delete it and re-run the build) or restore it from the "
            "cache's producer",
        )
    return records


def _sequences(records: ShardRecords) -> Iterator[Sequence]:
    arrays = {f.name: v for f, v in records.arrays() if f.dims[0] == "tokens"}
    offsets = records.seq_offsets
    for s in range(records.num_sequences):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        if hi - lo >= 2:  # a one-token sequence has no next token to learn
            yield Sequence({name: v[lo:hi] for name, v in arrays.items()})


def _grouped(
    items: Iterator[Sequence | SkippedShard], batch_tokens: int
) -> Iterator[list[Sequence] | SkippedShard]:
    """`batches` of the sequences among `items`; the `SkippedShard` marks pass through."""
    held: list[Sequence] = []
    tokens = 0
    for item in items:
        if isinstance(item, SkippedShard):
            yield item
            continue
        if held and tokens + len(item) > batch_tokens:
            yield held
            held, tokens = [], 0
        held.append(item)
        tokens += len(item)
    if held:
        yield held


def batches(sequences: Iterator[Sequence], batch_tokens: int) -> Iterator[list[Sequence]]:
    """Group sequences into batches of about `batch_tokens` tokens (at least one sequence)."""
    return _grouped(sequences, batch_tokens)  # type: ignore[return-value]  # no SkippedShard


def worker_seed(worker_id: int) -> None:
    """DataLoader worker_init_fn: torch's own RNG is not used by the stream, numpy's is seeded per slot."""
    torch.manual_seed(torch.initial_seed() % 2**31 + worker_id)
