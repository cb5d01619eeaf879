"""The `kdcache` command: one click group, thin subcommands.

Each subcommand parses options, builds one config object and calls one function of a stage.
Heavy imports (torch, transformers, zarr) happen inside the commands so `kdcache --help` is fast.
This is the only place where a `KdcacheError` becomes a one-line message and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn kdcache's own errors (and a missing file) into one clear line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from schemas.errors import KdcacheError

        try:
            return fn(*args, **kwargs)
        except KdcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise click.ClickException(f"{exc}") from None

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def main() -> None:
    """Run a teacher once, distil many students.

    \b
      kdcache build  --teacher MODEL --dataset DATA --out CACHE   stage one: cache the teacher
      kdcache train  --cache CACHE --student MODEL --out DIR       stage two: distil a student
      kdcache inspect CACHE                                        what a cache holds
      kdcache validate CACHE [--deep]                              is a cache intact
      kdcache demo                                                 both stages on the embedded default

    CACHE is a local directory or an fsspec URL (s3://..., gs://..., memory://...).
    """


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--sample-tokens", default=20_000, show_default=True, help="Tokens read for the teacher statistics.")
@friendly_errors
def inspect(cache: str, as_json: bool, sample_tokens: int) -> None:
    """Show what CACHE holds: teacher, tokenizer, data, k, encodings, sizes, teacher statistics."""
    from schemas import open_cache
    from schemas.stats import describe

    info = describe(open_cache(cache), sample_tokens=sample_tokens)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(_format_inspect(info))


def _format_inspect(info: dict[str, Any]) -> str:
    stats = info["teacher_stats"]
    bpt = info["bytes_per_token"]
    enc = info["encoding"]
    lines = [
        f"cache        {info['url']}  ({info['status']}, schema {info['schema_version']}, {info['format']})",
        f"teacher      {info['teacher']['name_or_path']}  ({info['teacher'].get('model_type')}, {info['teacher'].get('dtype')})",
        f"tokenizer    {info['tokenizer']['name_or_path']}  vocab {info['tokenizer']['vocab_size']}  {info['tokenizer']['fingerprint'][:19]}",
        f"dataset      {info['dataset']['source']}  split {info['dataset'].get('split')}  {info['dataset']['num_documents']} documents",
        f"top-k        k={info['k']} of V={info['vocab_size']}  ids {enc.get('ids')}  values {enc.get('values')}"
        + (f"  temperatures {info['temperatures']}" if info["temperatures"] else "")
        + (f"  samples {info['num_samples']}" if info["num_samples"] else ""),
        f"size         {info['shards']} shards, {info['sequences']} sequences, {info['tokens']} tokens, "
        f"{info['bytes'] / 1e6:.2f} MB" + (f", {bpt:.1f} bytes/token" if bpt else ""),
    ]
    if stats.get("sampled_tokens"):
        lines.append(
            f"teacher      top-1 p {stats['mean_top1_prob']:.3f}   tail mass {stats['mean_tail_mass']:.4f}   "
            f"top-k entropy {stats['mean_topk_entropy_nats']:.3f} nats   label in top-k {stats['label_in_topk']:.3f}   "
            f"(from {stats['sampled_tokens']} tokens)"
        )
    return "\n".join(lines)


@main.command()
@click.argument("cache")
@click.option("--deep", is_flag=True, help="Also decode every record and check its invariants.")
@friendly_errors
def validate(cache: str, deep: bool) -> None:
    """Check CACHE: manifest, every shard's size and checksum; with --deep, every record.

    Exits 0 only if everything holds; otherwise prints one line per problem, naming the shard.
    """
    from schemas.validate import validate_cache

    problems = validate_cache(cache, deep=deep)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {cache} is valid" + (" (deep)" if deep else ""))
