"""Dataset -> documents -> windows -> packed rows: the input side of a build.

Each step is a generator, so a build holds about one batch in memory whatever the dataset size:

    load_rows(dataset)              (source_row, row)   files, a save_to_disk directory, a hub id
    tokenize_rows(rows, tokenizer)  (source_row, ids)   one document, framed by BOS/EOS
    segments(docs, max_length)      Segment             windows of at most max_length tokens
    pack(segments, max_length)      PackedBatch         (B, L) rows, several segments per row

The rules below decide the token stream, hence the dataset fingerprint of a cache:

- Sources. `dataset` is a file, a glob, a directory, or a hub dataset id (or a list of these,
  read in the order given). Files are .jsonl/.ndjson, .json (JSON lines or one array of
  objects), .parquet, .csv and .txt, optionally compressed (.gz, .bz2, .xz); local paths or
  fsspec URLs. Globs and directories are read in sorted path order (a directory: every
  supported file below it, names starting with "." or "_" skipped). A directory written by
  `datasets.save_to_disk` is read with `datasets.load_from_disk`; an id that is not a local path
  with `datasets.load_dataset(id, split=split, streaming=True)`. Everything is streamed except
  a .json array, which is parsed whole.
- Splits. Files hold one split, "train"; a saved `Dataset` holds "train" or the split it was
  saved from; a saved `DatasetDict` and a hub dataset are asked for `split`.
- Rows. A .txt file holds one document per block of lines; blocks are separated by blank
  (whitespace-only) lines, and a block's lines are joined with "\\n". `source_row` numbers the
  rows of all sources together from 0, empty documents included.
- Columns. With `chat_template`, the `messages` column is rendered with the tokenizer's chat
  template. Otherwise `text_field` is tokenised; when a row has no such column but has
  `input_ids`, those ids are used as-is (`text_field="input_ids"` forces this). In CSV files,
  `messages` and `input_ids` cells hold JSON.
- Framing. Text and rendered messages are tokenised without special tokens, then framed the
  same way: the tokenizer's BOS in front if it adds one by default (not doubled when the text
  or template already starts with it), and EOS at the end (not doubled). Pre-tokenised
  `input_ids` are used exactly as given. An empty text or message list is an empty document.
- Windows. A document longer than `max_length` is cut into consecutive windows of
  `max_length` tokens (the last one shorter); empty documents are skipped.
- Packing. Segments are placed greedily, first fit in stream order, into the rows of one
  batch; a batch is emitted when a segment fits none of its `rows_per_batch` rows.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from fsspec.utils import compressions, infer_compression

from cache_builder.tokenizer import TokenizerError
from schemas.errors import ConfigError, KdcacheError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "PackedBatch",
    "Segment",
    "load_rows",
    "pack",
    "segments",
    "tokenize_rows",
]

IGNORE_INDEX = -1
"""The label at a segment's last position and at padding."""

_READ_BATCH = 1024  # rows per record batch read from parquet or a datasets Arrow table
_EMPTY = np.zeros(0, dtype=np.int32)
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DataError(KdcacheError, ValueError):
    """The dataset cannot be read as asked: missing, empty, or without the needed column."""


@dataclass(frozen=True, eq=False)
class Segment:
    """One window of one document (compared by identity: it holds an array)."""

    source_row: int
    """The row of the dataset the document came from (see `load_rows`)."""
    source_start: int
    """Offset of this window's first token within the document's token ids."""
    input_ids: np.ndarray
    """(n,) int32, 1 <= n <= max_length."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """B rows of at most max_length tokens; each row holds whole segments, back to back.

    L is the longest row of the batch (at most max_length). Attention must not cross a
    segment boundary: `seq_lens` gives the boundaries.
    """

    input_ids: np.ndarray
    """(B, L) int64, pad_id after a row's last segment."""
    position_ids: np.ndarray
    """(B, L) int64, 0, 1, ... within each segment, 0 at padding."""
    labels: np.ndarray
    """(B, L) int64, the next token of the same segment; IGNORE_INDEX at a segment's last
    position and at padding."""
    seq_lens: list[list[int]]
    """Per row, the lengths of its segments in order."""
    segments: list[Segment]
    """All segments of the batch, row by row, in row order."""

    @property
    def num_tokens(self) -> int:
        """Token positions that are not padding."""
        return sum(sum(row) for row in self.seq_lens)


# ----------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class _Select:
    text_field: str
    chat_template: bool

    def column(self, columns: Iterable[str] | dict[str, Any], where: str) -> str:
        """The column a row's document is read from, or a DataError naming the ones there are."""
        cols = columns if isinstance(columns, dict) else set(columns)
        if self.chat_template:
            if "messages" in cols:
                return "messages"
            raise DataError(
                f"{where} has no 'messages' column, which --chat-template renders "
                f"(columns: {_listing(cols)})",
                hint="give a 'messages' column of [{'role': ..., 'content': ...}] lists, "
                "or drop --chat-template to tokenise --text-field",
            )
        if self.text_field in cols:
            return self.text_field
        if "input_ids" in cols:
            return "input_ids"
        raise DataError(
            f"{where} has no {self.text_field!r} column (columns: {_listing(cols)})",
            hint="pass --text-field with the column that holds the text, add a pre-tokenised "
            "'input_ids' column, or use --chat-template for a 'messages' column",
        )


def _listing(cols: Iterable[str]) -> str:
    return ", ".join(repr(c) for c in sorted(cols)) or "none"


# ----------------------------------------------------------------------------- sources


def load_rows(
    dataset: str | Sequence[str],
    *,
    split: str = "train",
    text_field: str = "text",
    chat_template: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read a dataset as (source_row, row), in a deterministic order (see the module docstring).

    Each row holds only the column its document is read from (`messages`, `text_field` or
    `input_ids`). Missing paths and columns raise at once or at the first row concerned.

    Raises:
        DataError: a path is missing, a glob matches nothing, a format is unknown, a column
            is missing, a split does not exist, or the dataset has no rows.
    """
    select = _Select(text_field, chat_template)
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names:
        raise DataError("no dataset given", hint="pass --dataset with a file, glob or hub id")
    readers = [_reader(name, split, select) for name in names]  # resolve paths eagerly
    return _numbered(itertools.chain.from_iterable(readers), ", ".join(names))


def _numbered(rows: Iterator[dict[str, Any]], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    count = 0
    for count, row in enumerate(rows, 1):
        yield count - 1, row
    if count == 0:
        raise DataError(
            f"dataset {name!r} has no rows",
            hint="check that the files are not empty and that --dataset/--split point at data",
        )


def _format(path: str) -> tuple[str | None, str | None]:
    """(format extension, compression) of a file name, e.g. ('.jsonl', 'gzip')."""
    stem, ext = os.path.splitext(path.lower())
    compression = None
    if ext[1:] in compressions and ext != ".zip":
        compression = infer_compression(path)
        stem, ext = os.path.splitext(stem)
    return (ext if ext in _FILE_READERS else None), compression


def _reader(name: str, split: str, select: _Select) -> Iterator[dict[str, Any]]:
    url = name if "://" in name else os.path.expanduser(name)
    fs, path = url_to_fs(url)
    if match := _GLOB_CHARS.search(path):
        base = path[: path.rfind("/", 0, match.start()) + 1]
        files = sorted(
            p
            for p, info in fs.glob(path, detail=True).items()
            if info["type"] == "file" and not _hidden(p[len(base) :], ".")
        )
        if not files:
            raise DataError(f"no files match {name!r}", hint="check the pattern and the path")
        return _read_files(fs, files, name, split, select)
    if fs.isdir(path):
        if fs.exists(f"{path}/dataset_dict.json") or fs.exists(f"{path}/state.json"):
            return _read_saved(url, split, select)
        files = sorted(
            p for p in fs.find(path) if _format(p)[0] and not _hidden(p[len(path) :], "._")
        )
        if not files:
            raise DataError(
                f"directory {name!r} holds no data files",
                hint=f"put {_supported()} files in it, or save a dataset there with "
                "datasets.save_to_disk",
            )
        return _read_files(fs, files, name, split, select)
    if fs.isfile(path):
        return _read_files(fs, [path], name, split, select)
    if "://" not in name and _HUB_ID.fullmatch(name) and _format(name)[0] is None:
        return _read_hub(name, split, select)
    raise DataError(
        f"dataset {name!r} not found: no such file or directory",
        hint="check the path (globs are allowed, e.g. 'data/*.jsonl'), or pass a hub dataset id",
    )


def _hidden(relative_path: str, prefixes: str) -> bool:
    """Whether a file or a folder on its path is hidden: dotfiles for globs, as a shell does;
    for a directory also "_" names (Spark's _SUCCESS, _metadata)."""
    return any(part[:1] in prefixes for part in relative_path.split("/") if part)


def _supported() -> str:
    return "/".join(sorted(_FILE_READERS))


def _read_files(
    fs: AbstractFileSystem, files: list[str], name: str, split: str, select: _Select
) -> Iterator[dict[str, Any]]:
    """Check the files and the split at once, then read the files one after the other."""
    if split != "train":
        raise DataError(
            f"data files hold one split, 'train', but --split {split!r} was asked of {name!r}",
            hint="point --dataset at that split's files and keep --split train",
        )
    local = isinstance(fs, LocalFileSystem)
    plan = [(path if local else fs.unstrip_protocol(path), path, *_format(path)) for path in files]
    for where, _, fmt, _ in plan:
        if fmt is None:
            raise DataError(
                f"{where!r} is not a supported data file",
                hint=f"use {_supported()} files (optionally .gz/.bz2/.xz compressed)",
            )
    return itertools.chain.from_iterable(
        _FILE_READERS[fmt](fs, path, compression, select, where)
        for where, path, fmt, compression in plan
        if fmt is not None
    )


def _open_text(
    fs: AbstractFileSystem, path: str, compression: str | None, newline: str | None = None
) -> Any:
    return fs.open(path, "rt", compression=compression, encoding="utf-8", newline=newline)


def _read_jsonl(
    fs: AbstractFileSystem, path: str, compression: str | None, select: _Select, where: str
) -> Iterator[dict[str, Any]]:
    with _open_text(fs, path, compression) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}:{lineno} is not valid JSON ({e})",
                    hint="write one JSON object per line",
                ) from e
            yield _project(row, select, f"{where}:{lineno}")


def _read_json(
    fs: AbstractFileSystem, path: str, compression: str | None, select: _Select, where: str
) -> Iterator[dict[str, Any]]:
    with _open_text(fs, path, compression) as f:
        head = ""
        while not head and (chunk := f.read(4096)):
            head = chunk.lstrip()
    if not head.startswith("["):  # JSON lines in a .json file, as `datasets` accepts them
        yield from _read_jsonl(fs, path, compression, select, where)
        return
    with _open_text(fs, path, compression) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where} is not valid JSON ({e})", hint="write an array of objects or JSON lines"
            ) from e
    for i, row in enumerate(rows):
        yield _project(row, select, f"{where}[{i}]")


def _project(row: Any, select: _Select, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(
            f"{where} is a JSON {type(row).__name__}, not an object",
            hint='write one object per row, e.g. {"text": "..."}',
        )
    col = select.column(row, where)
    return {col: row[col]}


def _read_parquet(
    fs: AbstractFileSystem, path: str, compression: str | None, select: _Select, where: str
) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb", compression=compression) as f:
        pf = pq.ParquetFile(f)
        col = select.column(pf.schema_arrow.names, where)
        for batch in pf.iter_batches(batch_size=_READ_BATCH, columns=[col]):
            for value in batch.column(0).to_pylist():
                yield {col: value}


def _read_csv(
    fs: AbstractFileSystem, path: str, compression: str | None, select: _Select, where: str
) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # documents are longer than the 128 KiB default
    with _open_text(fs, path, compression, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:  # an empty file
            return
        col = select.column(reader.fieldnames, where)
        for row in reader:
            value = row[col]
            if col in ("messages", "input_ids"):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{where} line {reader.line_num}: the {col!r} cell is not JSON ({e})",
                        hint=f"write {col!r} cells as JSON lists",
                    ) from e
            yield {col: value}


def _read_txt(
    fs: AbstractFileSystem, path: str, compression: str | None, select: _Select, where: str
) -> Iterator[dict[str, Any]]:
    if select.chat_template:
        raise DataError(
            f"{where} is a text file: it has no 'messages' for --chat-template",
            hint="use jsonl or parquet with a 'messages' column, or drop --chat-template",
        )
    block: list[str] = []
    with _open_text(fs, path, compression) as f:
        for line in itertools.chain(f, [""]):
            if line.strip():
                block.append(line.rstrip("\r\n"))
            elif block:
                yield {select.text_field: "\n".join(block)}
                block = []


_FILE_READERS = {
    ".csv": _read_csv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def _import_datasets(name: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"reading {name!r} needs the 'datasets' package",
            hint="pip install 'kdcache[datasets]'",
        ) from e
    return datasets


def _read_saved(url: str, split: str, select: _Select) -> Iterator[dict[str, Any]]:
    datasets = _import_datasets(url)
    ds = datasets.load_from_disk(url)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{url!r} has no split {split!r} (splits: {_listing(ds.keys())})",
                hint="pass --split with one of them",
            )
        ds = ds[split]
    elif split != "train" and str(ds.split) != split:
        raise DataError(
            f"{url!r} holds one dataset (split {str(ds.split)!r}), not split {split!r}",
            hint="keep --split train, or save a DatasetDict with that split",
        )
    col = select.column(ds.column_names, url)
    return (
        {col: value}
        for batch in ds.select_columns([col]).iter(batch_size=_READ_BATCH)
        for value in batch[col]
    )


def _read_hub(name: str, split: str, select: _Select) -> Iterator[dict[str, Any]]:
    datasets = _import_datasets(name)
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except (OSError, ValueError) as e:  # not found, offline, unknown split
        raise DataError(
            f"dataset {name!r} is not a local file or directory, and loading it from the "
            f"Hugging Face hub failed: {e}",
            hint="check the path, or the hub id, --split and network access "
            "(HF_DATASETS_OFFLINE must be unset)",
        ) from e
    return (_project(row, select, f"{name} row {i}") for i, row in enumerate(ds))


# ----------------------------------------------------------------------------- tokens


def tokenize_rows(
    rows: Iterable[tuple[int, dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    chat_template: bool = False,
    batch_size: int = 256,
) -> Iterator[tuple[int, np.ndarray]]:
    """Tokenise rows into documents (source_row, (n,) int32 ids), framed by BOS/EOS.

    Texts are tokenised `batch_size` rows at a time through the fast tokenizer. Every row gives
    one document, empty ones included (`segments` skips them).

    Raises:
        TokenizerError: the tokenizer has no EOS, or no chat template with `chat_template`.
        DataError: a row lacks its column, or its value has the wrong type or out-of-range ids.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token, which "
            "ends every document",
            hint="load it with cache_builder.tokenizer.load_tokenizer, or set tok.eos_token",
        )
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, "
            "which --chat-template needs",
            hint="use the instruct/chat model's tokenizer, or set tok.chat_template to a "
            "Jinja template and save_pretrained it",
        )
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    select = _Select(text_field, chat_template)
    return _tokenize(rows, tokenizer, select, bos, int(eos), batch_size)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (Llama does, GPT-2 not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and plain[:1] != [bos]


def _tokenize(
    rows: Iterable[tuple[int, dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    select: _Select,
    bos: int | None,
    eos: int,
    batch_size: int,
) -> Iterator[tuple[int, np.ndarray]]:
    vocab = len(tokenizer)
    it = iter(rows)
    while chunk := list(itertools.islice(it, batch_size)):
        docs: list[np.ndarray] = [_EMPTY] * len(chunk)
        texts: list[str] = []
        slots: list[int] = []
        for i, (source_row, row) in enumerate(chunk):
            where = f"row {source_row}"
            col = select.column(row, where)
            value = row[col]
            if col == "input_ids":
                docs[i] = _as_ids(value, vocab, where)
            elif col == "messages":
                if text := _render(tokenizer, value, where):
                    texts.append(text)
                    slots.append(i)
            elif value:
                if not isinstance(value, str):
                    raise DataError(
                        f"{where}: {col!r} is {type(value).__name__}, not str",
                        hint="pass --text-field with a text column",
                    )
                texts.append(value)
                slots.append(i)
        if texts:
            encoded = tokenizer(
                texts,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            for i, ids in zip(slots, encoded, strict=True):
                docs[i] = _frame(ids, bos, eos)
        for (source_row, _), ids in zip(chunk, docs, strict=True):
            yield source_row, ids


def _render(tokenizer: PreTrainedTokenizerBase, messages: Any, where: str) -> str:
    if messages is None or (isinstance(messages, list) and not messages):
        return ""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(
            f"{where}: 'messages' is not a list of {{'role': ..., 'content': ...}} objects",
            hint="write each conversation as a list of role/content objects",
        )
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as e:
        raise DataError(
            f"{where}: the chat template rejected these messages: {e}",
            hint="fix the conversation (e.g. roles must alternate) or drop the row",
        ) from e
    return str(text)


def _frame(ids: list[int], bos: int | None, eos: int) -> np.ndarray:
    if not ids:
        return _EMPTY
    head = [bos] if bos is not None and ids[0] != bos else []
    tail = [eos] if ids[-1] != eos else []
    return np.asarray(head + ids + tail, dtype=np.int32)


def _as_ids(value: Any, vocab: int, where: str) -> np.ndarray:
    if value is None:
        return _EMPTY
    ids = np.asarray(value)
    if ids.size == 0:
        return _EMPTY
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(
            f"{where}: 'input_ids' is not a flat list of integers (dtype {ids.dtype}, "
            f"shape {ids.shape})",
            hint="store one list of token ids per row",
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise DataError(
            f"{where}: 'input_ids' holds ids in [{lo}, {hi}], outside the tokenizer's "
            f"vocabulary [0, {vocab})",
            hint="tokenise the data with the teacher's tokenizer, or pass --text-field to "
            "tokenise a text column instead",
        )
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- windows and rows


def segments(
    docs: Iterable[tuple[int, np.ndarray]], max_length: int, *, source: str = "the dataset"
) -> Iterator[Segment]:
    """Cut documents into windows of at most `max_length` tokens; skip empty documents.

    Raises:
        ConfigError: max_length < 1.
        DataError: (when iterated to the end) no document had any token; `source` names it.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be at least 1, got {max_length}")
    return _windows(docs, max_length, source)


def _windows(
    docs: Iterable[tuple[int, np.ndarray]], max_length: int, source: str
) -> Iterator[Segment]:
    any_tokens = False
    for source_row, ids in docs:
        for start in range(0, len(ids), max_length):
            any_tokens = True
            yield Segment(source_row, start, ids[start : start + max_length])
    if not any_tokens:
        raise DataError(
            f"{source} holds no documents after tokenisation (every row was empty)",
            hint="check --text-field (or --chat-template) names the column with the data",
        )


def pack(
    segments: Iterable[Segment],
    max_length: int,
    *,
    pad_id: int,
    rows_per_batch: int | None = None,
    batch_tokens: int | None = None,
) -> Iterator[PackedBatch]:
    """Pack segments into batches of rows of at most `max_length` tokens.

    Give `rows_per_batch` (B) or `batch_tokens` (B = max(1, batch_tokens // max_length)).
    Each segment goes to the first row of the current batch with room for it, else to a new
    row; when the batch already has B rows, it is emitted and a new one started. So segments
    keep their stream order within a row and from one batch to the next, every batch but the
    last has B rows, and at most one batch is held in memory.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be at least 1, got {max_length}")
    if (rows_per_batch is None) == (batch_tokens is None):
        raise ConfigError("give exactly one of rows_per_batch and batch_tokens")
    if batch_tokens is not None:
        rows_per_batch = max(1, batch_tokens // max_length)
    rows = int(rows_per_batch or 0)
    if rows < 1:
        raise ConfigError(f"rows_per_batch must be at least 1, got {rows}")
    return _pack(segments, max_length, pad_id, rows)


def _pack(
    segments: Iterable[Segment], max_length: int, pad_id: int, batch_rows: int
) -> Iterator[PackedBatch]:
    rows: list[list[Segment]] = []
    room: list[int] = []
    for seg in segments:
        n = len(seg)
        if not 1 <= n <= max_length:
            raise ValueError(f"segment of {n} tokens does not fit max_length {max_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(seg)
                room[r] -= n
                break
        else:
            if len(rows) == batch_rows:
                yield _collate(rows, pad_id)
                rows, room = [], []
            rows.append([seg])
            room.append(max_length - n)
    if rows:
        yield _collate(rows, pad_id)


def _collate(rows: list[list[Segment]], pad_id: int) -> PackedBatch:
    seq_lens = [[len(s) for s in row] for row in rows]
    shape = (len(rows), max(sum(lens) for lens in seq_lens))
    input_ids = np.full(shape, pad_id, dtype=np.int64)  # (B, L)
    position_ids = np.zeros(shape, dtype=np.int64)  # (B, L)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)  # (B, L)
    for b, row in enumerate(rows):
        t = 0
        for seg in row:
            n = len(seg)
            input_ids[b, t : t + n] = seg.input_ids
            position_ids[b, t : t + n] = np.arange(n)
            labels[b, t : t + n - 1] = seg.input_ids[1:]
            t += n
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        seq_lens=seq_lens,
        segments=[seg for row in rows for seg in row],
    )
