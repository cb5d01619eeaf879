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
    """Turn kdcache's own errors, and a disk or store failing where kdcache did not wrap it
    (OSError, botocore, aiohttp), into one clear line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from schemas.errors import KdcacheError, one_line
        from schemas.storage import storage_failures

        try:
            return fn(*args, **kwargs)
        except KdcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except storage_failures() as exc:
            text = f"{exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            raise click.ClickException(one_line(text)) from None

    return wrapper  # type: ignore[return-value]


def cache_url(option: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that refuses a URL whose scheme fsspec cannot open, naming `option`,
    while the options are parsed: before a build reads its dataset or a train loads torch."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from schemas.errors import KdcacheError
        from schemas.storage import check_url

        try:
            if value is not None:
                check_url(value, option)
        except KdcacheError as exc:
            raise click.ClickException(str(exc)) from None
        return value

    return check


_BREAK_LOCK_HELP = (
    "Take the output's lock (lock.json) even from a writer that looks alive: only when it is "
    "dead (killed, its machine lost). A lock whose heartbeat is older than its stale time "
    "(300 s, or KDCACHE_LOCK_STALE_SECONDS; a live writer renews it every tenth of that) is "
    "taken over without this."
)


def storage_option(fn: F) -> F:
    """`--storage-option KEY=VALUE` (repeatable), handed to fsspec for every URL a command
    opens."""
    return click.option(
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        help="fsspec option for the cache's storage, repeatable: a dotted KEY nests "
        "(client_kwargs.endpoint_url=http://127.0.0.1:9000), a VALUE that reads as JSON "
        "(true, 3, {...}) is taken as such. Credentials given here never reach a manifest.",
    )(fn)


def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, text in _key_values(pairs, "--storage-option").items():
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(
                    f"{key!r} nests under {part!r}, which is already set to a value",
                    param_hint="--storage-option",
                )
            node = child
        node[leaf] = value
    return options


def _key_values(pairs: tuple[str, ...], option: str = "--loss-option") -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


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

    options = _storage_options(storage_option)
    info = describe(open_cache(cache, **options), sample_tokens=sample_tokens)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(_format_inspect(info))


def _format_inspect(info: dict[str, Any]) -> str:
    bpt = info["bytes_per_token"]
    enc = info["encoding"]
    lines = [
        f"cache        {info['url']}  ({info['status']}, schema {info['schema_version']}, {info['format']}, by {info['created_by']})",
        f"teacher      {info['teacher']['name_or_path']}  ({info['teacher'].get('model_type')}, {info['teacher'].get('dtype')})",
        f"tokenizer    {info['tokenizer']['name_or_path']}  vocab {info['tokenizer']['vocab_size']}  {info['tokenizer']['fingerprint'][:19]}",
        f"dataset      {info['dataset']['source']}  split {info['dataset'].get('split')}  {info['dataset']['num_documents']} documents",
        f"top-k        k={info['k']} of V={info['vocab_size']}  ids {enc.get('ids')}  values {enc.get('values')}"
        + (f"  temperatures {info['temperatures']}" if info["temperatures"] else "")
        + (f"  samples {info['num_samples']}" if info["num_samples"] else ""),
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

    problems = validate_cache(cache, deep=deep, **_storage_options(storage_option))
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {cache} is valid" + (" (deep)" if deep else ""))


def _floats(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers like 2,4; got {text!r}"
        ) from None


@main.command()
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
    help="Teacher's most likely next tokens kept per position.",
)
@click.option(
    "--samples",
    default=0,
    show_default=True,
    help="Tokens drawn per position from the teacher, for sampled-logit losses (rskd).",
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
@click.option("--break-lock", is_flag=True, help=_BREAK_LOCK_HELP)
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

    \b
    Example:
      kdcache build --teacher meta-llama/Llama-3.1-8B --dataset data/*.jsonl \\
                    --out s3://team/caches/llama8b-k64 --top-k 64 --temperatures 2 --samples 32
    """
    from cache_builder import BuildConfig
    from cache_builder import build as run_build

    opts["format"] = opts.pop("fmt")
    opts["temperatures"] = _floats(opts["temperatures"])
    opts["storage_options"] = _storage_options(opts.pop("storage_option"))
    cfg = BuildConfig(**opts)
    click.echo(run_build(cfg).summary())


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


@main.command(cls=_TrainCommand)
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
    "--temperature", type=float, help="Distillation temperature (default: the loss's own)."
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

    opts["loss_options"] = _key_values(opts.pop("loss_option"))
    opts["storage_options"] = _storage_options(opts.pop("storage_option"))
    cfg = TrainConfig(**opts)
    click.echo(run_train(cfg).summary())


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


_OVERWRITE_HELP = (
    "Replace a cache at the output made with other settings, or write into a non-empty "
    "directory that holds no cache."
)


@main.command()
@click.argument("caches", nargs=-1, required=True, metavar="CACHE...")
@click.option(
    "--out", required=True, callback=cache_url("--out"), help="Where the merged cache goes."
)
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--break-lock", is_flag=True, help=_BREAK_LOCK_HELP)
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

    options = _storage_options(storage_option)
    result = merge_caches(caches, out, overwrite=overwrite, break_lock=break_lock, **options)
    click.echo(result.summary())


@main.command()
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
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--break-lock", is_flag=True, help=_BREAK_LOCK_HELP)
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
        **_storage_options(storage_option),
    )
    click.echo(result.summary())


@main.command()
@click.argument("cache", callback=cache_url("CACHE"))
@click.option("--max-tokens", type=int, required=True, help="The most tokens the subset holds.")
@click.option("--out", required=True, callback=cache_url("--out"), help="Where the subset goes.")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--break-lock", is_flag=True, help=_BREAK_LOCK_HELP)
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

    options = _storage_options(storage_option)
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
