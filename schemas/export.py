"""A cache exported for tools that do not know kdcache: Parquet, and axolotl's KD datasets.

`export_cache(cache, to, out)` reads each shard of a complete cache (checksum, identity and the
record checks of `schemas.checks` first) and writes one row per sequence.

`parquet`: `out/part-00000.parquet`, ... (one file per shard, cache order): `sequence` (the
global index), the per-sequence fields as columns and the per-token fields as lists
(list<int32>, list<list<float32>>, ...), every field of `RECORD_FIELDS` decoded, nothing lost.

`axolotl`: a `datasets.Dataset.save_to_disk` folder with the pre-tokenized columns the
knowledge-distillation plugin of axolotl-ai-cloud/axolotl reads (src/axolotl/integrations/kd/):
input_ids, labels (= input_ids) and attention_mask (T,); target_token_ids (the teacher's
top-k), target_logprobs (renormalised over the top-k) and target_mask (T, k).

Alignment: target_*[t] describe the token at t + 1, as the cache's top-k does: no shift.
`AxolotlKDTrainer.compute_loss` (trainer.py) hands the student's hidden state at every t with
target_*[:, t] to `LigerFusedLinearKLTopKLogprobLoss` (kernels/liger.py), which shifts only the
labels of its CE term (`true_labels[:, 1:]`); `collator_online_teacher.py` aligns vLLM's prompt
logprobs the same way (first, None entry dropped; position t masked by labels[t + 1]). axolotl
before its KD rework of June 2025 (PR #2700) shifted target_* in the trainer instead.
`collator.py` (DataCollatorForKD) pads target_* to [B, T, k] (log-probs -1e9, ids 0, mask 0).
`topk_logprob/forward_kl.py` expects "already re-normalized" log-probs, which
`chat_template.py` makes (and rescales to kd_temperature) while it tokenizes; a saved,
pre-tokenized dataset skips that (`utils/data/wrappers.py` passes one with input_ids,
attention_mask and labels through), so the export does it: log softmax(top-k / T).

Lost in the axolotl export: the tail mass, lse, log_tail, label_logprob, temp_lse, samples,
content keys and source rows; sequences of fewer than two tokens; a -inf top-k log-prob
becomes -1e9 (axolotl's loss would multiply it by 0). Needs `datasets` for `axolotl` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from schemas.cache import Cache, open_cache
from schemas.checks import check_records
from schemas.errors import CacheCorruptError, ConfigError
from schemas.record import SEQUENCE, TOKEN, ShardRecords
from schemas.storage import is_local, join, resolve, shown, storage_errors
from schemas.version import FORMAT_VERSION, producer

EXPORT_TARGETS = ("axolotl", "parquet")
MARKER = "_kdcache.json"
"""Written last into every export: where it came from. Its `_` keeps Parquet readers
(pyarrow datasets, pandas, Spark) from taking it for data."""
ALIGNMENT = (
    "At position t of a row, topk_ids, topk_logprobs, lse, log_tail, temp_lse, label_logprob "
    "and sample_* describe the teacher's distribution of the NEXT token, input_ids[t + 1] of the "
    "same row, given input_ids[0..t]; label_logprob is the teacher's log-probability of "
    "input_ids[t + 1], NaN at the row's last position (its next token is not in the row)."
)
AXOLOTL_ALIGNMENT = (
    "target_token_ids[t], target_logprobs[t] describe the token at t + 1 (no shift: axolotl's "
    "KD trainer pairs the student's hidden state at t with target_*[t]); target_mask[t] is 1 "
    "unless t is the row's last position; target_logprobs = log softmax(teacher top-k "
    "log-probs / temperature) over the top-k."
)
LOGPROB_FLOOR = -1e9
"""What -inf top-k log-probs become in the axolotl export (the value axolotl pads with)."""
ROW_GROUP_TOKENS = 1 << 16
"""About this many tokens per Parquet row group: readers load a row group whole."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_cache` wrote; `summary()` is one line."""

    target: str
    out: str
    files: tuple[str, ...]
    sequences: int
    tokens: int
    left_out: int = 0
    """Sequences not exported (axolotl: fewer than two tokens)."""

    def summary(self) -> str:
        skipped = f", left out {self.left_out:,} sequences of < 2 tokens" if self.left_out else ""
        return (f"exported {self.sequences:,} sequences ({self.tokens:,} tokens) to {self.out} "
                f"as {self.target}: {len(self.files)} files{skipped}")  # fmt: skip


def export_cache(
    cache_url: str,
    to: str,
    out: str,
    *,
    overwrite: bool = False,
    temperature: float = 1.0,
    **storage_options: Any,
) -> ExportResult:
    """Export the complete cache at `cache_url` to `out` as `to` (one of `EXPORT_TARGETS`).

    `out` must be new or empty; with `overwrite` an earlier export there (one holding
    `MARKER`) is replaced. A local `out` is written beside itself and renamed into place at the
    end, so a failed export leaves nothing behind. `temperature` (axolotl only) rescales the
    teacher's top-k before renormalising it.
    """
    if to not in EXPORT_TARGETS:
        raise ConfigError(
            f"--to {to!r} is not a known export", hint=f"use one of {', '.join(EXPORT_TARGETS)}"
        )
    if to != "axolotl" and temperature != 1.0:
        raise ConfigError("--temperature applies only to --to axolotl", hint="leave it out")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be positive, got {temperature}")
    cache = open_cache(cache_url, require_complete=True, **storage_options)
    if not cache.shards:
        raise ConfigError(f"{shown(cache_url)} holds no shards", hint="nothing to export")
    fs, root = resolve(out, **storage_options)
    datasets = _import_datasets() if to == "axolotl" else None
    if datasets is not None and not is_local(fs):
        raise ConfigError(
            f"--to axolotl writes a local folder, not {shown(out)}",
            hint="export to a local OUT, then copy it (axolotl reads local folders)",
        )
    _check_output(cache, fs, root, out, overwrite)
    with _staged(fs, root, out) as (target, scratch):
        if datasets is None:
            files, sequences, tokens, left_out = _write_parquet(cache, fs, target, out)
        else:
            files, sequences, tokens, left_out = _write_axolotl(
                cache, target, scratch, temperature, datasets
            )
        info = describe(cache, to, files, sequences, tokens, temperature)
        with storage_errors(out, f"writing {MARKER}"):
            fs.pipe_file(join(target, MARKER), json.dumps(info, indent=2).encode())
    return ExportResult(to, shown(out), tuple(files), sequences, tokens, left_out)


def describe(
    cache: Cache, to: str, files: list[str], sequences: int, tokens: int, temperature: float
) -> dict[str, Any]:
    """The content of `MARKER`: the source cache, its layout, the alignment and the columns."""
    m = cache.manifest
    if to == "parquet":
        columns = {"sequence": "index of the sequence in the cache, in cache order (0, 1, ...)"}
        columns |= {f.name: f.meaning for f in cache.layout.fields()}
        alignment = ALIGNMENT
    else:
        columns = {name: meaning for name, (_, _, meaning) in AXOLOTL_COLUMNS.items()}
        alignment = AXOLOTL_ALIGNMENT
    return {
        "kdcache_export": {"to": to, "by": producer(), "format_version": FORMAT_VERSION},
        "cache": {
            "url": shown(cache.url),
            "fingerprint": m.fingerprint,
            "schema_version": m.schema_version,
            "teacher": m.teacher.name_or_path,
            "teacher_weights_sha256": m.teacher.weights_sha256,
            "tokenizer": m.tokenizer.name_or_path,
            "tokenizer_fingerprint": m.tokenizer.fingerprint,
            "dataset_fingerprint": m.dataset.fingerprint,
        },
        "k": cache.layout.k,
        "vocab_size": cache.layout.vocab_size,
        "temperatures": list(cache.layout.temperatures),
        "num_samples": cache.layout.num_samples,
        "samples_listed": (
            None
            if not cache.layout.num_samples
            else "outside the top-k only"
            if cache.layout.compact_samples and cache.layout.k
            else "every draw"
        ),
        "temperature": temperature,
        "alignment": alignment,
        "columns": columns,
        "sequences": sequences,
        "tokens": tokens,
        "files": files,
    }


# -- Parquet -----------------------------------------------------------------------------------


def parquet_table(records: ShardRecords, first_sequence: int, large: bool = False) -> pa.Table:
    """One row per sequence: `sequence` (global index), the per-sequence fields, then each
    per-token field as a list over the sequence's tokens (of lists over k, samples, ...)."""
    columns: dict[str, pa.Array] = {
        "sequence": pa.array(np.arange(records.num_sequences, dtype=np.int64) + first_sequence)
    }
    present = dict((f.name, (f, v)) for f, v in records.arrays())
    for f, values in present.values():
        if f.dims[0] == SEQUENCE:
            columns[f.name] = pa.array(values)
    for f, values in present.values():
        if f.dims[0] == TOKEN:
            columns[f.name] = _lists(values, records.seq_offsets, large)
    return pa.table(columns)


def _write_parquet(
    cache: Cache, fs: AbstractFileSystem, target: str, out: str
) -> tuple[list[str], int, int, int]:
    widest = max((cache.layout.k, cache.layout.num_samples, len(cache.layout.temperatures)))
    large = max(s.num_tokens for s in cache.shards) * widest >= 2**31  # int32 list offsets
    files, first, tokens = [], 0, 0
    metadata = {b"kdcache": json.dumps(_identity(cache)).encode()}
    for i in range(len(cache.shards)):
        records = _checked(cache, i)
        table = parquet_table(records, first, large).replace_schema_metadata(metadata)
        name = f"part-{i:05d}.parquet"
        per_row = max(1, records.num_tokens // max(1, records.num_sequences))
        with storage_errors(out, f"writing {name}"):
            pq.write_table(
                table,
                join(target, name),
                filesystem=fs,
                compression="zstd",
                row_group_size=max(1, ROW_GROUP_TOKENS // per_row),
            )
        files.append(name)
        first += records.num_sequences
        tokens += records.num_tokens
    return files, first, tokens, 0


def _identity(cache: Cache) -> dict[str, Any]:
    return {
        "cache_fingerprint": cache.manifest.fingerprint,
        "format_version": FORMAT_VERSION,
        "k": cache.layout.k,
        "vocab_size": cache.layout.vocab_size,
        "alignment": ALIGNMENT,
    }


# -- axolotl -----------------------------------------------------------------------------------


AXOLOTL_COLUMNS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "input_ids": ("int64", (TOKEN,), "the input token ids (the cache's input_ids)"),
    "labels": ("int64", (TOKEN,), "= input_ids; the trainer shifts them for its CE term"),
    "attention_mask": ("int8", (TOKEN,), "all 1 (rows hold one sequence, no padding)"),
    "target_token_ids": ("int32", (TOKEN, "k"), "the teacher's top-k ids for token t + 1"),
    "target_logprobs": ("float32", (TOKEN, "k"), "log softmax(top-k log-probs / T) over the k"),
    "target_mask": ("int8", (TOKEN, "k"), "1 where position t has a next token, else 0"),
}
"""name: (dtype, dims, meaning) of the axolotl export's columns."""


def axolotl_table(records: ShardRecords, temperature: float = 1.0) -> tuple[pa.Table, int]:
    """The axolotl KD columns of `records`' sequences of two tokens or more, and how many
    shorter sequences were left out."""
    lengths = np.diff(records.seq_offsets)  # (S,)
    kept = lengths >= 2
    tokens = np.repeat(kept, lengths)  # (N,) positions of the kept sequences
    offsets = np.concatenate([[0], np.cumsum(lengths[kept])]).astype(np.int64)
    ids = records.input_ids[tokens].astype(np.int64)  # (N',)
    k = records.topk_ids.shape[1]
    logits = records.topk_logprobs[tokens].astype(np.float64) / temperature  # (N', k)
    top = logits[:, :1]  # rank 0: the largest, finite for any valid record
    logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
    mask = np.ones((ids.shape[0], k), dtype=np.int8)
    mask[offsets[1:] - 1] = 0  # each sequence's last position: no next token
    values = {
        "input_ids": ids,
        "labels": ids,
        "attention_mask": np.ones(ids.shape[0], dtype=np.int8),
        "target_token_ids": records.topk_ids[tokens].astype(np.int32),
        "target_logprobs": np.maximum(logprobs, LOGPROB_FLOOR).astype(np.float32),
        "target_mask": mask,
    }
    table = pa.table({name: _lists(v, offsets, False) for name, v in values.items()})
    return table, int((~kept).sum())


def _write_axolotl(
    cache: Cache, target: str, scratch: str, temperature: float, datasets: Any
) -> tuple[list[str], int, int, int]:
    """Each shard's table to an Arrow stream file in `scratch` (memory-mapped by `datasets`,
    so the whole export never sits in memory), then one `save_to_disk`."""
    parts, left_out, tokens = [], 0, 0
    for i in range(len(cache.shards)):
        table, dropped = axolotl_table(_checked(cache, i), temperature)
        left_out += dropped
        tokens += sum(len(chunk.flatten()) for chunk in table.column("input_ids").chunks)
        path = os.path.join(scratch, f"{i:05d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        parts.append(datasets.Dataset.from_file(path))
    dataset = datasets.concatenate_datasets(parts)
    dataset.save_to_disk(target)
    files = sorted(n for n in os.listdir(target) if not n.startswith("."))
    return files, len(dataset), tokens, left_out


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "--to axolotl needs the 'datasets' package", hint="pip install 'kdcache[datasets]'"
        ) from None
    return datasets


# -- shared ------------------------------------------------------------------------------------


def _lists(values: np.ndarray, offsets: np.ndarray, large: bool) -> pa.Array:
    """`values` (N, ...) as one list per sequence (lists of lists for 2-D values)."""
    kind = pa.LargeListArray if large else pa.ListArray
    index = np.int64 if large else np.int32
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    if values.ndim == 2:
        width = values.shape[1]
        inner = np.arange(0, values.shape[0] * width + 1, width, dtype=index)
        flat = kind.from_arrays(pa.array(inner), flat)
    return kind.from_arrays(pa.array(offsets.astype(index)), flat)


def _checked(cache: Cache, index: int) -> ShardRecords:
    """Shard `index`'s records after the checks the trainer runs (`schemas.checks`)."""
    info = cache.shards[index]
    records = cache.read_shard(info)
    if problems := check_records(records, cache.layout, info):
        raise CacheCorruptError(
            f"shard {info.name} of {shown(cache.url)} holds bad records: {problems[0]}",
            hint=f"run `kdcache validate --deep {shown(cache.url)}`, then restore the shard",
        )
    return records


def _check_output(
    cache: Cache, fs: AbstractFileSystem, root: str, out: str, overwrite: bool
) -> None:
    """Refuse an output that is the cache (or inside it, or holding it), a file, or a folder
    with anything but an earlier export in it (and that only with `overwrite`)."""
    where = shown(out)
    with storage_errors(out, "looking at the output"):
        if is_local(fs) and is_local(cache.fs):
            mine, theirs = os.path.realpath(root), os.path.realpath(cache.root)
            if os.path.commonpath([mine, theirs]) in (mine, theirs):
                raise ConfigError(
                    f"the output {where} is or holds or lies inside the cache {shown(cache.url)}",
                    hint="export to a folder outside the cache",
                )
        if not fs.exists(root):
            return
        if not fs.isdir(root):
            raise ConfigError(f"the output {where} is a file", hint="give a folder to export to")
        if not fs.ls(root, detail=False):
            return
        if not overwrite:
            raise ConfigError(
                f"the output {where} exists and is not empty",
                hint="choose a new or empty folder, or pass --overwrite to replace an earlier "
                "export there",
            )
        if not fs.isfile(join(root, MARKER)):
            raise ConfigError(
                f"the output {where} holds files but no {MARKER}: it is not an earlier "
                "`kdcache export`, which is all --overwrite replaces",
                hint="choose a new or empty folder, or empty this one yourself",
            )


@contextlib.contextmanager
def _staged(fs: AbstractFileSystem, root: str, out: str) -> Iterator[tuple[str, str]]:
    """(folder to write the export into, scratch folder). Locally both lie in a hidden folder
    beside `root`; the export is renamed into place when the block ends without an error, and
    the hidden folder is removed either way. On an object store the export is written in place
    (an earlier one removed first); there is no scratch."""
    if not is_local(fs):
        with storage_errors(out, "replacing the earlier export"):
            if fs.exists(root):
                fs.rm(root, recursive=True)
        yield root, ""
        return
    parent, name = posixpath.split(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    try:
        staged, scratch = os.path.join(work, "new"), os.path.join(work, "scratch")
        os.makedirs(staged)
        os.makedirs(scratch)
        yield staged, scratch
        if os.path.exists(root):
            os.rename(root, os.path.join(work, "old"))
        os.rename(staged, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "ALIGNMENT",
    "AXOLOTL_COLUMNS",
    "EXPORT_TARGETS",
    "MARKER",
    "ExportResult",
    "axolotl_table",
    "export_cache",
    "parquet_table",
]
