"""Where a build's documents come from: files, globs, directories, save_to_disk, hub datasets.

`load_rows` yields (source_row, row) for `cache_builder.data` to tokenise. Its rules decide the
token stream, hence the dataset fingerprint of a cache:

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
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from fsspec.utils import compressions, infer_compression

from schemas.errors import KdcacheError

__all__ = ["DataError", "DocumentColumn", "load_rows"]

_READ_BATCH = 1024  # rows per record batch read from parquet or a datasets Arrow table
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DataError(KdcacheError, ValueError):
    """The dataset cannot be read as asked: missing, empty, or without the needed column."""


# ----------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class DocumentColumn:
    """Which column of a row holds its document: `messages` under --chat-template, else
    `text_field`, else pre-tokenised `input_ids`."""

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
    select = DocumentColumn(text_field, chat_template)
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


def _reader(name: str, split: str, select: DocumentColumn) -> Iterator[dict[str, Any]]:
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
    fs: AbstractFileSystem, files: list[str], name: str, split: str, select: DocumentColumn
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
    fs: AbstractFileSystem, path: str, compression: str | None, select: DocumentColumn, where: str
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
    fs: AbstractFileSystem, path: str, compression: str | None, select: DocumentColumn, where: str
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


def _project(row: Any, select: DocumentColumn, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(
            f"{where} is a JSON {type(row).__name__}, not an object",
            hint='write one object per row, e.g. {"text": "..."}',
        )
    col = select.column(row, where)
    return {col: row[col]}


def _read_parquet(
    fs: AbstractFileSystem, path: str, compression: str | None, select: DocumentColumn, where: str
) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb", compression=compression) as f:
        pf = pq.ParquetFile(f)
        col = select.column(pf.schema_arrow.names, where)
        for batch in pf.iter_batches(batch_size=_READ_BATCH, columns=[col]):
            for value in batch.column(0).to_pylist():
                yield {col: value}


def _read_csv(
    fs: AbstractFileSystem, path: str, compression: str | None, select: DocumentColumn, where: str
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
    fs: AbstractFileSystem, path: str, compression: str | None, select: DocumentColumn, where: str
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


def _read_saved(url: str, split: str, select: DocumentColumn) -> Iterator[dict[str, Any]]:
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


def _read_hub(name: str, split: str, select: DocumentColumn) -> Iterator[dict[str, Any]]:
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
