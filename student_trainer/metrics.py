"""What a training run reports: metrics.jsonl always, TensorBoard events when tensorboard is
importable, a loss-curve PNG at the end (when matplotlib is), and result.json.

Both files are strict JSON, whatever the run met: a value that is not finite (a diverged loss)
is written as null, since NaN and Infinity are not JSON and strict parsers refuse them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from student_trainer.checkpoint import Progress

METRICS = "metrics.jsonl"
RESULT = "result.json"


@dataclass
class TrainResult:
    out: str
    steps: int
    tokens: int
    seconds: float
    """Time in the step loop, over the whole run (resumes included)."""
    final_loss: float | None
    """The last step's loss (None when no step was taken)."""
    eval: dict[str, float] = field(default_factory=dict)
    bad_shards: list[str] = field(default_factory=list)
    approximations: dict[str, float] = field(default_factory=dict)
    """The loss's approximation statistics, averaged over every micro-batch of the run."""

    def summary(self) -> str:
        loss = "none" if self.final_loss is None else f"{self.final_loss:.4f}"
        line = f"trained {self.steps} steps on {self.tokens} tokens in {self.seconds:.1f} s; final loss {loss}"
        if self.eval:
            line += "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval.items())
        if self.bad_shards:
            names = ", ".join(self.bad_shards[:5]) + (", ..." if len(self.bad_shards) > 5 else "")
            line += f"; skipped {len(self.bad_shards)} bad shards ({names})"
        return line

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(finite(asdict(self)), indent=2, allow_nan=False))


def finite(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None, in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class MetricLog:
    """metrics.jsonl always; TensorBoard when installed; a loss-curve PNG at the end.

    A fresh run starts both afresh. A resumed run (`resumed`, the checkpoint's progress) first
    cuts metrics.jsonl back to what its checkpoint covers, and has TensorBoard hide the events
    of the steps after it: the resume logs those steps again.
    """

    def __init__(self, out: Path, enabled: bool, *, resumed: Progress | None = None) -> None:
        self.path, self.enabled = out / METRICS, enabled
        self.tb = None
        if not enabled:
            return
        if resumed is None:
            self.path.unlink(missing_ok=True)
        elif resumed.metrics_bytes is not None and self.size() > resumed.metrics_bytes:
            os.truncate(self.path, resumed.metrics_bytes)
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = resumed.step + 1 if resumed is not None else None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
        except ImportError:  # tensorboard is optional
            self.tb = None

    def size(self) -> int:
        """Bytes of metrics.jsonl written so far (what a checkpoint saved now covers)."""
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(finite(row), allow_nan=False) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        """Flush the TensorBoard events still queued (its writer flushes on a two-minute timer)."""
        if self.tb is not None:
            self.tb.close()

    def plot(self, target: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(
                "kdcache: matplotlib is not installed: no loss-curve PNG (pip install matplotlib)",
                file=sys.stderr,
                flush=True,
            )
            return
        rows = (
            [json.loads(line) for line in self.path.read_text().splitlines()]
            if self.path.exists()
            else []
        )
        fig, ax = plt.subplots(figsize=(6, 3.5))
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        if train:
            ax.plot(*zip(*train, strict=False), label="train loss")
        evals = [(r["step"], r["eval_ce"]) for r in rows if r.get("eval_ce") is not None]
        if evals:
            ax.plot(*zip(*evals, strict=False), "o-", label="eval CE")
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(target, dpi=100)
        plt.close(fig)
