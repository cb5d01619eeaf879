"""`kdcache build`: stage one, a teacher over a dataset into a cache; its options make one
`BuildConfig`.
"""

from __future__ import annotations

from typing import Any

import click

from kdcache._options import (
    BREAK_LOCK_HELP,
    cache_url,
    friendly_errors,
    parse_storage_options,
    storage_option,
)


def _floats(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers like 2,4; got {text!r}"
        ) from None


@click.command()
@click.option(
    "--teacher",
    help="Teacher: a Hugging Face causal LM directory or hub id. Default: the embedded teacher.",
)
@click.option(
    "--dataset",
    help="jsonl/json/parquet/csv/txt files or globs, a save_to_disk directory, or a hub id. Default: the embedded corpus.",
)
@click.option(
    "--out",
    required=True,
    callback=cache_url("--out"),
    help="Where the cache goes: a directory or an fsspec URL (s3://bucket/cache).",
)
@click.option("--revision", help="Git revision of a hub teacher.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    help="Teacher dtype (auto: bf16 on GPU, fp32 on CPU).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option(
    "--tp",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Split the teacher over N ranks with transformers' tensor parallelism (layers by head, "
    "lm_head by vocabulary). Run under torchrun with a multiple of N processes: world = "
    "data-parallel groups x N. NCCL between GPUs, gloo on CPU.",
)
@click.option(
    "--device-map",
    type=click.Choice(["auto"]),
    help="One process, the teacher's layers placed over this node's GPUs (then CPU, then "
    "disk) by accelerate. The simplest way to fit a big teacher, but it runs one GPU at a "
    "time: --tp runs them all at once.",
)
@click.option(
    "--max-memory",
    metavar="DEV=SIZE,...",
    help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.",
)
@click.option(
    "--attn-implementation",
    help="sdpa, eager, flash_attention_2, flex_attention (default: the model's).",
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Allow the teacher's own modelling code to run."
)
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option(
    "--text-field",
    default="text",
    show_default=True,
    help="Column with the text (an input_ids column is used as is).",
)
@click.option(
    "--chat-template",
    is_flag=True,
    help="Render a `messages` column with the tokenizer's chat template.",
)
@click.option(
    "--max-documents", type=int, help="Use only the first N rows of the dataset (quick trials)."
)
@click.option(
    "--skip-bad-rows",
    is_flag=True,
    help="Leave out rows that cannot be read or tokenised (invalid UTF-8 or JSON, a text that "
    "is not a string, ragged input_ids, ...) and the unreadable rest of a corrupt or truncated "
    "file; they are counted in the summary and the manifest. Without it the first one stops "
    "the build, naming its file and row. A null text is an empty document, not a bad row.",
)
@click.option(
    "--max-length",
    default=2048,
    show_default=True,
    help="Tokens per packed row; longer documents are windowed, shorter ones packed without cross-attention.",
)
@click.option(
    "--top-k",
    default=64,
    show_default=True,
    help="Teacher's most likely next tokens kept per position; 0 with --samples N stores "
    "samples only (for rskd).",
)
@click.option(
    "--samples",
    default=0,
    show_default=True,
    help="Tokens drawn per position from the teacher, for fkl-hybrid (exact top-k, sampled "
    "tail) and rskd. Only the draws outside the top-k are stored, as distinct ids with counts "
    "(--samples 32 adds ~34 B/token to top-64 on the embedded teacher; make bench-samples).",
)
@click.option(
    "--sample-temperature",
    default=1.0,
    show_default=True,
    help="Temperature the samples are drawn at.",
)
@click.option(
    "--temperatures",
    help="Also store log-sum-exp(logits/T) for these T, e.g. 2,4 (exact KD tails at T != 1).",
)
@click.option(
    "--value-encoding",
    help="How log-probs are stored (float32, float16, bfloat16, q8, ...). Default: per vocabulary.",
)
@click.option(
    "--id-encoding", help="How top-k ids are stored (uint16, uint32, ...). Default: per vocabulary."
)
@click.option(
    "--format",
    "fmt",
    default="zarr",
    show_default=True,
    type=click.Choice(["zarr", "arrow"]),
    help="zarr: sharded arrays (object stores); arrow: IPC files (pyarrow, DuckDB, datasets).",
)
@click.option(
    "--shard-tokens",
    default=1 << 20,
    show_default=True,
    help="Tokens per shard: the unit of commit, resume and shuffling.",
)
@click.option(
    "--batch-tokens", default=16384, show_default=True, help="Tokens per teacher forward."
)
@click.option(
    "--vocab-chunk",
    default=131072,
    show_default=True,
    help="Vocabulary columns per step of the top-k pass: each step holds 2048 x this many "
    "logits in the teacher's dtype (memory vs speed; the default covers a 128k vocabulary).",
)
@click.option("--seed", default=0, show_default=True, help="Seeds the sampled tokens.")
@click.option(
    "--overwrite", is_flag=True, help="Replace a cache at --out made with other settings."
)
@click.option("--break-lock", is_flag=True, help=BREAK_LOCK_HELP)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bar with tokens/s and ETA.",
)
@storage_option
@friendly_errors
def build(**opts: Any) -> None:
    """Run a teacher over a dataset once and cache its top-k distribution per token.

    \b
    Re-running the same command resumes an interrupted build; on a finished cache it says so
    and exits 0; on a cache made with other settings it refuses unless --overwrite. While it
    runs, the build holds a lock on --out (lock.json): a second build there refuses at once.
    Under torchrun, every rank writes its own shards:
      torchrun --nproc_per_node 8 -m kdcache build --teacher ... --dataset ... --out s3://...
    A teacher larger than one GPU is split over ranks with --tp (8 GPUs, one 70B teacher):
      torchrun --nproc_per_node 8 -m kdcache build --teacher meta-llama/Llama-3.3-70B --tp 8 ...

    \b
    Example:
      kdcache build --teacher meta-llama/Llama-3.1-8B --dataset data/*.jsonl \\
                    --out s3://team/caches/llama8b-k64 --top-k 64 --temperatures 2 --samples 32
    """
    from cache_builder import BuildConfig
    from cache_builder import build as run_build

    opts["format"] = opts.pop("fmt")
    opts["temperatures"] = _floats(opts["temperatures"])
    opts["storage_options"] = parse_storage_options(opts.pop("storage_option"))
    cfg = BuildConfig(**opts)
    click.echo(run_build(cfg).summary())
