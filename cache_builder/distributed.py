"""Ranks under `torchrun`: who am I, and waiting for the others. One process when not launched."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

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

    @classmethod
    def from_env(cls) -> Ranks:
        """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and join the process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if os.environ.get("MASTER_PORT") == "0":
            raise ConfigError(
                "torchrun --master-port 0 hands every rank port 0, where they never meet",
                hint="pass --standalone (one machine) or a free --master-port",
            )
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            # Ranks only wait for each other (no tensor ever moves between them), so gloo
            # serves CPU and GPU builds alike and keeps NCCL off the teacher's GPU.
            dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        return ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
