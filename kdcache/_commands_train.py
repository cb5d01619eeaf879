"""`kdcache train`: stage two, a student distilled from a cache; its options make one
`TrainConfig`. The loss table is loaded only to check --loss or to print the help.
"""

from __future__ import annotations

from typing import Any

import click

from kdcache._options import (
    cache_url,
    friendly_errors,
    parse_key_values,
    parse_storage_options,
    storage_option,
)


class _TrainCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from student_trainer.losses import LOSSES

        formatter.write_paragraph()
        formatter.write_text("Losses (--loss NAME; options with --loss-option key=value):")
        with formatter.indentation():
            for name, spec in sorted(LOSSES.items()):
                opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
                formatter.write_text(f"{name}: {spec.summary}. Options: {opts or 'none'}.")


def _loss_names() -> list[str]:
    from student_trainer.losses import LOSSES

    return sorted(LOSSES)


class _LazyChoice(click.Choice):
    """click.Choice over the loss table, loaded only when the value is checked."""

    def __init__(self) -> None:
        super().__init__([])

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        self.choices = _loss_names()
        return super().convert(value, param, ctx)

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return "NAME"


@click.command(cls=_TrainCommand)
@click.option(
    "--cache",
    required=True,
    callback=cache_url("--cache"),
    help="The teacher cache (directory or fsspec URL).",
)
@click.option(
    "--out",
    required=True,
    help="Directory for the student, checkpoints, metrics.jsonl and loss_curve.png.",
)
@click.option("--student", help="Student to start from: a causal LM directory or hub id.")
@click.option(
    "--student-config",
    help="JSON model config for a fresh student (default: the embedded small student).",
)
@click.option(
    "--tokenizer", help="Student tokenizer (default: the student's own, else the cache's copy)."
)
@click.option(
    "--allow-vocab-extension",
    is_flag=True,
    help="Accept a student tokenizer that extends the teacher's.",
)
@click.option(
    "--loss",
    default="fkl",
    show_default=True,
    type=_LazyChoice(),
    help="Distillation loss (listed below).",
)
@click.option(
    "--loss-option", "loss_option", multiple=True, help="key=value for the loss, repeatable."
)
@click.option(
    "--ce-weight",
    default=0.0,
    show_default=True,
    help="Weight of next-token cross-entropy mixed in.",
)
@click.option(
    "--temperature",
    type=float,
    help="Distillation temperature (default: the loss's own). Tail terms are exact at a T the "
    "build stored (kdcache build --temperatures T), approximate elsewhere (a warning says so).",
)
@click.option(
    "--strict-temperature",
    is_flag=True,
    help="Refuse a temperature the cache stored no log-sum-exp for, instead of warning.",
)
@click.option(
    "--z-loss", default=0.0, show_default=True, help="PaLM z-loss coefficient (e.g. 1e-4)."
)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--warmup-steps", default=20, show_default=True)
@click.option("--max-steps", type=int, help="Optimizer steps (default: --epochs over the cache).")
@click.option("--epochs", default=1.0, show_default=True)
@click.option("--batch-tokens", default=8192, show_default=True, help="Tokens per micro-batch.")
@click.option(
    "--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option("--clip", default=1.0, show_default=True, help="Gradient-norm clip (0: off).")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--shuffle-buffer", default=1024, show_default=True, help="Sequences held for shuffling."
)
@click.option(
    "--num-workers", default=0, show_default=True, help="DataLoader workers decoding shards."
)
@click.option(
    "--checkpoint-every",
    default=0,
    show_default=True,
    help="Save a resumable checkpoint every N steps.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue exactly from the checkpoint in --out. Refuses, naming each, a changed setting "
    "that alters what is trained (cache, student, loss and its options, schedule, batch, seed, "
    "...); where the run writes, how often it reports and where it runs may change.",
)
@click.option(
    "--eval-cache",
    callback=cache_url("--eval-cache"),
    help="Held-out cache: student CE, KL to teacher top-k, top-1 agreement.",
)
@click.option(
    "--eval-every", default=0, show_default=True, help="Evaluate every N steps (0: at the end)."
)
@click.option("--device", default="auto", show_default=True)
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (default: on with CUDA).")
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun, shard the student (weights, gradients, optimizer state) over the ranks "
    "with FSDP instead of copying it to each with DDP. Use it when the student with its AdamW "
    "state does not fit one device; DDP is faster when it does. No effect in one process.",
)
@click.option(
    "--logit-block",
    default=1 << 24,
    show_default=True,
    help="The most student logits (rows x vocabulary) the loss holds at once. Per-token losses "
    "run over blocks of this many / V rows and take each block's gradient as they go, so a step "
    "costs what plain cross-entropy costs without its [tokens, vocabulary] logits. Lower it if a "
    "step runs out of memory.",
)
@click.option(
    "--skip-bad-shards",
    is_flag=True,
    help="Count and skip bad shards instead of stopping: missing ones, ones that fail their "
    "checksum, whose own metadata disagrees with the manifest, or whose records fail the "
    "content checks (ids outside the vocabulary, NaN log-probs, broken offsets, ...). The "
    "result names the skipped shards.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@storage_option
@friendly_errors
def train(**opts: Any) -> None:
    """Distil a student from a teacher cache; the teacher is never loaded.

    \b
    Example:
      kdcache train --cache s3://team/caches/llama8b-k64 --student ./llama-1b \\
                    --out runs/fkl --loss fkl-tail --ce-weight 0.1 --max-steps 2000
    """
    from student_trainer import TrainConfig
    from student_trainer import train as run_train

    opts["loss_options"] = parse_key_values(opts.pop("loss_option"))
    opts["storage_options"] = parse_storage_options(opts.pop("storage_option"))
    cfg = TrainConfig(**opts)
    click.echo(run_train(cfg).summary())
