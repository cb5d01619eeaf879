"""`kdcache merge`, `split` and `subset`: caches made from caches (`schemas.derive`)."""

from __future__ import annotations

import click

from kdcache._options import (
    BREAK_LOCK_HELP,
    OVERWRITE_HELP,
    cache_url,
    friendly_errors,
    parse_storage_options,
    storage_option,
)


@click.command()
@click.argument("caches", nargs=-1, required=True, metavar="CACHE...")
@click.option(
    "--out", required=True, callback=cache_url("--out"), help="Where the merged cache goes."
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--break-lock", is_flag=True, help=BREAK_LOCK_HELP)
@storage_option
@friendly_errors
def merge(
    caches: tuple[str, ...],
    out: str,
    overwrite: bool,
    break_lock: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Merge caches into one, keeping each document once.

    \b
    Only caches that mean the same merge: the same teacher (weights hash), tokenizer, format,
    layout, encoding and build settings (k, max length, packing, samples, temperatures, dtype);
    otherwise the command names the first setting that differs. All must be complete caches of
    format 2.0 or later (they carry content keys; rebuild older ones).

    \b
    A document (same content key, document_hash) held by several caches is kept from the first
    CACHE that holds it, all its windows; later caches drop every sequence of it. Shards with
    nothing dropped are hard-linked on a local disk and copied by the store itself on object
    stores; the others are rewritten, their stored bytes unchanged. Re-running a killed merge
    resumes it.

    \b
    Example:
      kdcache merge s3://team/caches/web-k64 s3://team/caches/code-k64 \\
                    --out s3://team/caches/web+code-k64
    """
    from schemas.derive import merge_caches

    options = parse_storage_options(storage_option)
    result = merge_caches(caches, out, overwrite=overwrite, break_lock=break_lock, **options)
    click.echo(result.summary())


@click.command()
@click.argument("cache", callback=cache_url("CACHE"))
@click.option(
    "--val-fraction",
    type=float,
    required=True,
    help="Share of the tokens that goes to the val part (at least this much, by whole documents).",
)
@click.option(
    "--out-train",
    required=True,
    callback=cache_url("--out-train"),
    help="Where the train part goes.",
)
@click.option(
    "--out-val", required=True, callback=cache_url("--out-val"), help="Where the val part goes."
)
@click.option("--seed", default=0, show_default=True, help="Which documents go to val.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--break-lock", is_flag=True, help=BREAK_LOCK_HELP)
@storage_option
@friendly_errors
def split(
    cache: str,
    val_fraction: float,
    out_train: str,
    out_val: str,
    seed: int,
    overwrite: bool,
    break_lock: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Split CACHE into train and val by whole documents: all windows of a document (same
    content key) go to the same side, so nothing of a val document is trained on.

    \b
    Documents are ordered by a hash of (seed, content key) and taken into val until val holds
    at least --val-fraction of the tokens; the rest is train. The same seed gives the same split
    of the same cache, whatever its shard order. Shards wholly on one side are hard-linked (or
    copied by the store); the others are rewritten, their stored bytes unchanged.

    \b
    Example:
      kdcache split s3://team/caches/web-k64 --val-fraction 0.02 --seed 0 \\
                    --out-train s3://team/caches/web-k64-train --out-val s3://team/caches/web-k64-val
    """
    from schemas.derive import split_cache

    result = split_cache(
        cache,
        val_fraction=val_fraction,
        out_train=out_train,
        out_val=out_val,
        seed=seed,
        overwrite=overwrite,
        break_lock=break_lock,
        **parse_storage_options(storage_option),
    )
    click.echo(result.summary())


@click.command()
@click.argument("cache", callback=cache_url("CACHE"))
@click.option("--max-tokens", type=int, required=True, help="The most tokens the subset holds.")
@click.option("--out", required=True, callback=cache_url("--out"), help="Where the subset goes.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--break-lock", is_flag=True, help=BREAK_LOCK_HELP)
@storage_option
@friendly_errors
def subset(
    cache: str,
    max_tokens: int,
    out: str,
    overwrite: bool,
    break_lock: bool,
    storage_option: tuple[str, ...],
) -> None:
    """The start of CACHE: its sequences in cache order (shard by shard), whole, up to the
    first one that would take the total past --max-tokens. The subset never holds more than
    --max-tokens tokens, and holds fewer when a sequence does not fit (it stops there; no later,
    shorter sequence is picked instead). Documents windowed across that point are cut.

    \b
    Whole shards are hard-linked (or copied by the store); the last, partial one is rewritten,
    its stored bytes unchanged.

    \b
    Example (a quick trial on the first 10M tokens of a cache):
      kdcache subset s3://team/caches/web-k64 --max-tokens 10000000 --out ./web-k64-10M
    """
    from schemas.derive import subset_cache

    options = parse_storage_options(storage_option)
    click.echo(
        subset_cache(
            cache,
            max_tokens=max_tokens,
            out=out,
            overwrite=overwrite,
            break_lock=break_lock,
            **options,
        ).summary()
    )
