"""The `kdcache` command: one click group, thin subcommands.

Each subcommand parses options, builds one config object and calls one function of a stage.
Heavy imports (torch, transformers, zarr) happen inside the commands so `kdcache --help` is fast.
The CLI is the only place where a `KdcacheError` becomes a one-line message and a non-zero
exit (`kdcache._options.friendly_errors`, which every command wears).

This module holds the group and the commands that only read a cache; the two stages and the
derivations are defined beside it (`kdcache._commands_*`) and registered here.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from kdcache._commands_build import build
from kdcache._commands_derive import merge, split, subset
from kdcache._commands_export import export
from kdcache._commands_train import train
from kdcache._options import cache_url, friendly_errors, parse_storage_options, storage_option

# transformers imports every installed quantization backend when it loads a model; torchao then
# warns on a machine without its GPU kernels, and torch that torchao registers enums the old
# way. Neither is about the user's command, so the command's own output is not drowned in them.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def main() -> None:
    """Run a teacher once, distil many students.

    \b
      kdcache build  --teacher MODEL --dataset DATA --out CACHE   stage one: cache the teacher
      kdcache train  --cache CACHE --student MODEL --out DIR       stage two: distil a student
      kdcache inspect CACHE                                        what a cache holds
      kdcache validate CACHE [--deep]                              is a cache intact
      kdcache merge CACHE... --out CACHE                           one cache, each document once
      kdcache split CACHE --val-fraction F --out-train A --out-val B
                                                                   train/val by whole documents
      kdcache subset CACHE --max-tokens N --out CACHE              its first sequences, <= N tokens
      kdcache export CACHE --to parquet|axolotl OUT                for tools without kdcache
      kdcache demo                                                 both stages on the embedded default

    CACHE is a local directory or an fsspec URL (s3://..., gs://..., memory://...).
    """


@main.command()
@click.argument("cache", callback=cache_url("CACHE"))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--sample-tokens",
    default=20_000,
    show_default=True,
    help="Tokens read for the teacher statistics.",
)
@storage_option
@friendly_errors
def inspect(cache: str, as_json: bool, sample_tokens: int, storage_option: tuple[str, ...]) -> None:
    """Show what CACHE holds: teacher, tokenizer, data, k, encodings, sizes, and the fidelity
    the build measured (teacher statistics and encoding error), from the manifest alone.

    Caches of format 1.x carry no fidelity block: their teacher statistics are computed from
    --sample-tokens tokens of their shards instead.
    """
    from schemas import open_cache
    from schemas.stats import describe

    options = parse_storage_options(storage_option)
    info = describe(open_cache(cache, **options), sample_tokens=sample_tokens)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(_format_inspect(info))


def _quantized(quantization: dict[str, Any] | None) -> str:
    if not quantization:
        return ""
    return f"  quantization: {quantization.get('quant_method', 'unknown')}"


def _format_inspect(info: dict[str, Any]) -> str:
    bpt = info["bytes_per_token"]
    enc = info["encoding"]
    lines = [
        f"cache        {info['url']}  ({info['status']}, schema {info['schema_version']}, {info['format']}, by {info['created_by']})",
        f"teacher      {info['teacher']['name_or_path']}  ({info['teacher'].get('model_type')}, {info['teacher'].get('dtype')})"
        + _quantized(info["teacher"].get("quantization")),
        f"tokenizer    {info['tokenizer']['name_or_path']}  vocab {info['tokenizer']['vocab_size']}  {info['tokenizer']['fingerprint'][:19]}",
        f"dataset      {info['dataset']['source']}  split {info['dataset'].get('split')}  {info['dataset']['num_documents']} documents",
        f"top-k        k={info['k']} of V={info['vocab_size']}  ids {enc.get('ids')}  values {enc.get('values')}"
        + (f"  temperatures {info['temperatures']}" if info["temperatures"] else "")
        + (f"  samples {info['num_samples']}{_sample_kind(info)}" if info["num_samples"] else ""),
        f"size         {info['shards']} shards, {info['sequences']} sequences, {info['tokens']} tokens, "
        f"{info['bytes'] / 1e6:.2f} MB" + (f", {bpt:.1f} bytes/token" if bpt else ""),
    ]
    if derived := info.get("derived"):
        sources = ", ".join(s["url"] for s in derived["sources"])
        lines.append(f"derived      {derived['operation']} of {sources}")
    if fid := info.get("fidelity"):
        label = fid["label_in_topk"]
        lines.append(
            f"fidelity     tail mass {fid['mean_tail_mass']:.4f}   top-k entropy "
            f"{fid['mean_topk_entropy_nats']:.3f} nats   label in top-k "
            + (f"{label:.3f}" if label is not None else "n/a")
            + f"   (all {fid['positions']} positions, "
            + ("from the source shards)" if info.get("derived") else "measured at build)")
        )
        lines.append(
            f"encoding     max |log-prob error| {fid['encoding_max_abs_logprob_error']:.2e}   "
            f"top-k KL {fid['encoding_mean_topk_kl']:.2e} nats   "
            f"(on {fid['encoding_sampled_positions']} positions)"
        )
    elif (stats := info.get("teacher_stats") or {}).get("sampled_tokens"):
        lines.append(
            f"teacher      top-1 p {stats['mean_top1_prob']:.3f}   tail mass {stats['mean_tail_mass']:.4f}   "
            f"top-k entropy {stats['mean_topk_entropy_nats']:.3f} nats   label in top-k {stats['label_in_topk']:.3f}   "
            f"(from {stats['sampled_tokens']} tokens; this cache predates fidelity blocks)"
        )
    return "\n".join(lines)


def _sample_kind(info: dict) -> str:
    if not info.get("compact_samples"):
        return " (every draw listed)"
    return " (samples only)" if info["k"] == 0 else " (draws outside the top-k listed)"


@main.command()
@click.argument("cache", callback=cache_url("CACHE"))
@click.option("--deep", is_flag=True, help="Also decode every record and check its invariants.")
@storage_option
@friendly_errors
def validate(cache: str, deep: bool, storage_option: tuple[str, ...]) -> None:
    """Check CACHE: manifest, every shard's size and checksum; with --deep, every record.

    Exits 0 only if everything holds; otherwise prints one line per problem, naming the shard.
    """
    from schemas.validate import validate_cache

    problems = validate_cache(cache, deep=deep, **parse_storage_options(storage_option))
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {cache} is valid" + (" (deep)" if deep else ""))


@main.command()
@click.option(
    "--out", default="demo_out", show_default=True, help="Working directory for the demo."
)
@click.option(
    "--steps", default=None, type=int, help="Training steps per student (default: the demo's own)."
)
@friendly_errors
def demo(out: str, steps: int | None) -> None:
    """Both stages end to end on the embedded teacher and corpus, offline, on CPU."""
    from kdcache.demo import run_demo

    click.echo(run_demo(out, steps=steps))


main.add_command(build)
main.add_command(train)
main.add_command(merge)
main.add_command(split)
main.add_command(subset)
main.add_command(export)
