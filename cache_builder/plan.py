"""The deterministic plan of a build: which segments go into which shard, and which rank
writes it.

Shards are runs of consecutive segments of the token stream, cut when a shard reaches
`shard_tokens`. Shard i belongs to rank i % world_size. The plan depends only on the data and the
settings, so every rank of a `torchrun` build, and every rerun of an interrupted build, computes
the same one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cache_builder.data import Segment


@dataclass(frozen=True)
class ShardPlan:
    index: int
    first_segment: int
    """Position of the shard's first segment in the build's segment stream."""
    num_segments: int
    num_tokens: int


@dataclass(frozen=True)
class BuildPlan:
    shards: tuple[ShardPlan, ...]
    num_tokens: int

    def for_rank(self, rank: int, world_size: int) -> list[ShardPlan]:
        return [s for s in self.shards if s.index % world_size == rank]


def make_plan(segment_lengths: Iterable[int], shard_tokens: int) -> BuildPlan:
    """Cut the stream of segment lengths into shards of about `shard_tokens` tokens each.

    A shard closes as soon as adding the next segment would pass `shard_tokens` (so a shard
    can be smaller, never larger, unless a single segment is larger than `shard_tokens`).
    """
    shards: list[ShardPlan] = []
    first = count = tokens = total = 0
    for i, n in enumerate(segment_lengths):
        if count and tokens + n > shard_tokens:
            shards.append(ShardPlan(len(shards), first, count, tokens))
            first, count, tokens = i, 0, 0
        count += 1
        tokens += n
        total += n
    if count:
        shards.append(ShardPlan(len(shards), first, count, tokens))
    return BuildPlan(tuple(shards), total)


def segments_of(
    stream: Iterable[Segment], wanted: list[ShardPlan]
) -> Iterator[tuple[ShardPlan, list[Segment]]]:
    """(shard, its segments) for the `wanted` shards, in order, from one pass over `stream`.

    Holds one shard's segments at a time; segments of other shards are skipped.
    """
    by_start = {s.first_segment: s for s in wanted}
    remaining = len(wanted)
    current: ShardPlan | None = None
    held: list[Segment] = []
    if not wanted:
        return
    for i, seg in enumerate(stream):
        if current is None and i in by_start:
            current, held = by_start[i], []
        if current is not None:
            held.append(seg)
            if len(held) == current.num_segments:
                yield current, held
                current, remaining = None, remaining - 1
                if remaining == 0:
                    return
