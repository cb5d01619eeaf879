"""What a training run logs: metrics.jsonl always, TensorBoard events when tensorboard is
importable, and a loss-curve PNG at the end (when matplotlib is)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class MetricLog:
    """metrics.jsonl always; TensorBoard when installed; a loss-curve PNG at the end."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path, self.enabled = out / "metrics.jsonl", enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
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
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if train:
            ax.plot(*zip(*train, strict=False), label="train loss")
        evals = [(r["step"], r["eval_ce"]) for r in rows if "eval_ce" in r]
        if evals:
            ax.plot(*zip(*evals, strict=False), "o-", label="eval CE")
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(target, dpi=100)
        plt.close(fig)
