"""`checkpoint.pt` in --out: everything a run needs to go on as if it had never stopped.

It holds the full tensors (student, optimizer, schedule, random states), the run's `Progress`
(where it stands and the running sums its result covers, so that a resumed run reports the
whole run, not its last part), the resolved config, and the `trained_settings` that `--resume`
refuses to see changed.

`Progress.metrics_bytes` is how much of metrics.jsonl the checkpoint covers: a row is logged
before the checkpoint of its step is saved, so a run killed in between has logged rows that
its resume logs again; the resume cuts metrics.jsonl back to what the checkpoint covers first.

A save is atomic: `checkpoint.pt.tmp`, flushed to disk, then renamed over the previous one. A
kill inside a save leaves the previous checkpoint intact and the temporary, which the next run
removes before it writes anything.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from schemas.errors import ConfigError, one_line
from student_trainer.config import changed_settings
from student_trainer.parallel import full_state, load_full_state

CHECKPOINT = "checkpoint.pt"
TEMPORARY = CHECKPOINT + ".tmp"


@dataclass
class Progress:
    """Where a run stands, and the sums over every step it took (across resumes)."""

    step: int = 0
    micro: int = 0
    """Micro-batches consumed: a resume replays the deterministic stream past this many."""
    epoch: int = 0
    tokens: int = 0
    seconds: float = 0.0
    """Time spent in the step loop (a resume adds its own; steps redone after a kill count once)."""
    last_loss: float | None = None
    approx: dict[str, list[float]] = field(default_factory=dict)
    """Approximation statistics of the loss: name -> [sum over micro-batches, micro-batches]."""
    bad_shards: list[str] = field(default_factory=list)
    metrics_bytes: int | None = None
    """The length of metrics.jsonl when the checkpoint was saved (None: not recorded)."""
    final_eval: dict[str, float] | None = None
    """The evaluation after the last step, once made: a finished run resumed reports it again."""

    def add_approximation(self, name: str, value: float) -> None:
        total = self.approx.setdefault(name, [0.0, 0])
        total[0] += value
        total[1] += 1

    def approximations(self) -> dict[str, float]:
        return {name: total / count for name, (total, count) in self.approx.items() if count}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Progress:
        """Parse what `asdict` saved; fields a checkpoint lacks (an older kdcache) keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint in `out`, read back whole (every rank reads it: --out is shared)."""
    path = out / CHECKPOINT
    if not path.exists():
        raise ConfigError(
            f"--resume: no checkpoint at {path}", hint="run without --resume to start afresh"
        )
    try:
        payload = torch.load(path, weights_only=False)
        if not isinstance(payload, dict) or "model" not in payload:
            raise ValueError("not a kdcache checkpoint")
    except Exception as exc:  # torch.load raises whatever its unpickler meets
        raise ConfigError(
            f"--resume: {path} cannot be read ({type(exc).__name__}: {one_line(str(exc))[:200]})",
            hint="restore it from a copy, or run without --resume to start afresh",
        ) from None
    return payload


def check_resume(
    payload: Mapping[str, Any], out: Path, settings: Mapping[str, Any], config: Mapping[str, Any]
) -> bool:
    """Refuse, naming every change, a resume whose command changes what the checkpoint was
    trained with. False when the checkpoint predates the settings check (nothing compared)."""
    if "settings" not in payload:
        return False
    changes = changed_settings(payload["settings"], settings, payload.get("config", {}), config)
    if changes:
        raise ConfigError(
            f"--resume: the run in {out} was trained with other settings: {'; '.join(changes)}",
            hint="resume with the run's own settings (only where it writes, how often it "
            "reports and where it runs may change), or start a new run in another --out",
        )
    return True


def restore(payload: Mapping[str, Any], net: nn.Module, optimizer, schedule) -> Progress:
    """Load the checkpoint's tensors and random states into this run; return its progress."""
    load_full_state(net, optimizer, payload["model"], payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    torch.set_rng_state(payload["rng"]["torch"])
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    return Progress.from_json(payload.get("progress") or payload["state"])


def save_checkpoint(
    out: Path,
    net: nn.Module,
    optimizer,
    schedule,
    progress: Progress,
    *,
    config: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    """Every rank calls this (under FSDP gathering the full state is a collective); rank 0
    writes. The checkpoint holds full tensors keyed by name, whatever the parallelism."""
    model_state, optimizer_state = full_state(net, optimizer)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    payload = {
        "model": model_state,
        "optimizer": optimizer_state,
        "schedule": schedule.state_dict(),
        "progress": asdict(progress),
        "config": dict(config),
        "settings": dict(settings),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }
    tmp = out / TEMPORARY
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, out / CHECKPOINT)  # a kill before this line leaves the previous one intact


def remove_temporary(out: Path) -> None:
    """Delete what a run killed inside a save left (rank 0, before anything is written)."""
    (out / TEMPORARY).unlink(missing_ok=True)
