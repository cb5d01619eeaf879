"""Keeping the device busy: teacher signals leave the device asynchronously and are encoded
and written on a worker thread while the next forward runs.

The main thread only launches work: forward, top-k, and a non-blocking copy into pinned host
memory. One writer thread per build waits for each copy, turns it into `ShardRecords`, checks
it, and hands it to the shard writer, in order. At most `depth` batches are in flight, which
bounds host memory whatever the dataset size.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch

from cache_builder.data import PackedBatch
from cache_builder.topk import TeacherSignals, check_finite
from schemas.record import ShardRecords


@dataclass
class HostSignals:
    """`TeacherSignals` on their way to (or already in) pinned host memory."""

    tensors: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None

    def numpy(self) -> dict[str, np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()  # deliberate sync: on the writer thread, not the main one
        return {name: t.numpy() for name, t in self.tensors.items()}


def to_host(signals: TeacherSignals) -> HostSignals:
    """Start copying every tensor of `signals` to the host without waiting for it."""
    tensors = {}
    for f in fields(signals):
        t = getattr(signals, f.name)
        if t is None:
            continue
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            tensors[f.name] = host
        else:
            tensors[f.name] = t
    ready = None
    if any(
        getattr(signals, f.name) is not None and getattr(signals, f.name).device.type == "cuda"
        for f in fields(signals)
    ):
        ready = torch.cuda.Event()
        ready.record()
    return HostSignals(tensors, ready)


def records_from(
    host: dict[str, np.ndarray], batch: PackedBatch, *, shard: int, batch_index: int
) -> ShardRecords:
    """The records of one packed batch: one sequence per segment, tokens in segment order.

    Raises `NonFiniteError` naming the shard and batch if the teacher's logits hold NaN or
    +inf (seen through their log-sum-exp, on the host: the device never waits for this check).
    """
    check_finite(
        torch.from_numpy(host["lse"]),
        batch_index=batch_index,
        shard=shard,
        name="logits (through their log-sum-exp)",
    )
    lengths = [len(s) for s in batch.segments]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = dict(
        input_ids=np.concatenate([s.input_ids for s in batch.segments]).astype(np.int32),
        topk_ids=host["topk_ids"].astype(np.int32),
        topk_logprobs=host["topk_logprobs"],
        lse=host["lse"],
        log_tail=host["log_tail"],
        label_logprob=host["label_logprob"],
        source_row=np.array([s.source_row for s in batch.segments], dtype=np.int64),
        source_start=np.array([s.source_start for s in batch.segments], dtype=np.int64),
        document_hash=np.array([s.document_hash for s in batch.segments], dtype=np.uint64),
        seq_offsets=offsets,
    )
    if "temp_lse" in host:
        arrays["temp_lse"] = host["temp_lse"]
    if "sample_ids" in host:
        arrays["sample_ids"] = host["sample_ids"].astype(np.int32)
        arrays["sample_counts"] = host["sample_counts"].astype(np.uint16)
        arrays["sample_logprobs"] = host["sample_logprobs"]
    return ShardRecords(**arrays)


class WriterThread:
    """Runs jobs in submission order on one thread, with at most `depth` waiting.

    Once a job fails, no later job runs: a shard's commit is queued behind its writes, and must
    never run after one of them failed (it would commit a shard missing that batch).
    """

    def __init__(self, depth: int = 3) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        self._pending: collections.deque[Future[object]] = collections.deque()
        self._depth = depth
        self._stopped = False  # read and set on the writer thread; set by close()

    def submit(self, job: Callable[[], object]) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()  # re-raises the job's error here, in the main thread
        self._pending.append(self._pool.submit(self._guarded, job))

    def _guarded(self, job: Callable[[], object]) -> object:
        if self._stopped:
            return None
        try:
            return job()
        except BaseException:
            self._stopped = True
            raise

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Stop: the running job finishes, queued ones are dropped (their shards stay uncommitted).

        Errors of dropped jobs are not raised, so the error that stopped the build is the one
        reported.
        """
        self._stopped = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
