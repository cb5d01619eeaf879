"""Ranks under `torchrun`: who am I, which tensor-parallel group is mine, and waiting for the
others. One process when not launched.

World = data-parallel groups x `tp`. Ranks r with the same r // tp form one tensor-parallel
group: they hold one teacher between them, run the same batches, and its first rank writes
the group's shards. Shards are dealt over the data-parallel groups.

transformers' tensor parallelism shards over the whole default process group, so with tp > 1
each group gets a default group of its own, rendezvoused through a prefix of torchrun's store,
and all ranks meet in a separate gloo group for barriers. With tp == 1 the default group is the
world, as before, and no tensor ever moves between ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from schemas.errors import ConfigError

BARRIER_TIMEOUT = timedelta(hours=24)
"""How long a rank waits for the others. The final barrier waits for the slowest rank's whole
share (on a resumed build, one rank may have everything left to do), so it is long; a rank
that dies makes torchrun stop the others long before."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp: int = 1
    """Ranks per tensor-parallel group (--tp)."""
    _everyone: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    """The gloo group of all ranks when the default group is a tensor-parallel group."""

    @classmethod
    def from_env(cls, tp: int = 1) -> Ranks:
        """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and join the process groups."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if tp < 1:
            raise ConfigError(f"--tp must be at least 1, got {tp}")
        if world % tp:
            raise ConfigError(
                f"--tp {tp} does not divide the {world} process(es) of this run"
                + (" (it was not started by torchrun)" if world == 1 else ""),
                hint=f"start a multiple of {tp} processes, e.g. torchrun --nproc_per_node {tp} "
                "-m kdcache build ... (world = data-parallel groups x --tp)",
            )
        if world == 1:
            return cls()
        if os.environ.get("MASTER_PORT") == "0":
            raise ConfigError(
                "torchrun --master-port 0 hands every rank port 0, where they never meet",
                hint="pass --standalone (one machine) or a free --master-port",
            )
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if tp == 1:
            if not dist.is_initialized():
                # Ranks only wait for each other (no tensor ever moves between them), so gloo
                # serves CPU and GPU builds alike and keeps NCCL off the teacher's GPU.
                dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
            return cls(rank, world, local)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=BARRIER_TIMEOUT))
        group, tp_rank = divmod(rank, tp)
        # The teacher's collectives: NCCL between GPUs, gloo on the CPU.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"kdcache/tp-group-{group}", store),
            rank=tp_rank,
            world_size=tp,
            timeout=BARRIER_TIMEOUT,
        )
        everyone = dist.ProcessGroupGloo(
            dist.PrefixStore("kdcache/all", store), rank, world, BARRIER_TIMEOUT
        )
        return cls(rank, world, local, tp, everyone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_rank(self) -> int:
        """This rank's place in its tensor-parallel group."""
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        """Which data-parallel group (which share of the shards) this rank works on."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes its group's shards (the first rank of each group)."""
        return self.tp_rank == 0

    def barrier(self) -> None:
        """Wait for every rank of the run."""
        if self._everyone is not None:
            self._everyone.barrier().wait()
        elif self.world_size > 1:
            dist.barrier()

    def share_in_group(self, value: object) -> object:
        """The value the group's writer passes (the same object on every rank of the group)."""
        if self.tp == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)  # the default group is this rank's TP group
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
