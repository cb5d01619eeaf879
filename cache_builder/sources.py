"""Where a build's documents come from: files, globs, directories, save_to_disk, hub datasets.

`load_rows` yields (source_row, row) for `cache_builder.data` to tokenise. Its rules decide the
token stream, hence the dataset fingerprint of a cache:

- Sources. `dataset` is a file, a glob, a directory, or a hub dataset id (or a list of these,
  read in the order given). Files are those of `cache_builder.formats`; local paths or fsspec
  URLs. Globs and directories are read in sorted path order (a directory: every
  supported file below it, names starting with "." or "_" skipped). A directory written by
  `datasets.save_to_disk` is read with `datasets.load_from_disk`; an id that is not a local path
  with `datasets.load_dataset(id, split=split, streaming=True)`. Everything is streamed except
  a .json array, which is parsed whole.
- Splits. Files hold one split, "train"; a saved `Dataset` holds "train" or the split it was
  saved from; a saved `DatasetDict` and a hub dataset are asked for `split`.
- Rows. `source_row` numbers the rows of all sources together from 0, empty documents and bad
  rows included (`cache_builder.rows`: a bad row stops the build, or is skipped and counted);
  `max_rows` stops before reading row `max_rows`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from fsspec.utils import compressions, infer_compression

from cache_builder.formats import FILE_READERS, read_file
from cache_builder.rows import BadRows, DataError, DocumentColumn, Row, listing

__all__ = ["BadRows", "DataError", "DocumentColumn", "Row", "load_rows"]

_READ_BATCH = 1024  # rows per record batch read from parquet or a datasets Arrow table
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ----------------------------------------------------------------------------- sources


def load_rows(
    dataset: str | Sequence[str],
    *,
    split: str = "train",
    text_field: str = "text",
    chat_template: bool = False,
    max_rows: int | None = None,
    bad_rows: BadRows | None = None,
) -> Iterator[tuple[int, Row]]:
    """Read a dataset as (source_row, row), in a deterministic order (see the module docstring).

    Each row holds only the column its document is read from (`messages`, `text_field` or
    `input_ids`), and where it was read. Missing paths and columns raise at once or at the
    first row concerned; bad rows and files go to `bad_rows` (default: the first one raises).

    Raises:
        DataError: a path is missing, a glob matches nothing, a format is unknown, a column
            is missing, a split does not exist, the dataset has no rows, or (unless skipped)
            a row or a file is bad.
    """
    bad = bad_rows if bad_rows is not None else BadRows()
    select = DocumentColumn(text_field, chat_template)
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names:
        raise DataError("no dataset given", hint="pass --dataset with a file, glob or hub id")
    readers = [_reader(name, split, select, bad) for name in names]  # resolve paths eagerly
    return _numbered(itertools.chain.from_iterable(readers), ", ".join(names), max_rows, bad)


def _numbered(
    rows: Iterator[Row | None], name: str, max_rows: int | None, bad: BadRows
) -> Iterator[tuple[int, Row]]:
    """Number the rows, skipped ones (None) included; stop before row `max_rows`."""
    count = 0
    while max_rows is None or count < max_rows:
        row = next(rows, _END)
        if row is _END:
            break
        if row is not None:
            yield count, row
        count += 1
    if count == 0:
        skipped = f"; {bad.report()}" if bad.files else ""
        raise DataError(
            f"dataset {name!r} has no rows{skipped}",
            hint="check that the files are not empty and that --dataset/--split point at data",
        )


_END: Any = object()


def _format(path: str) -> tuple[str | None, str | None]:
    """(format extension, compression) of a file name, e.g. ('.jsonl', 'gzip')."""
    stem, ext = os.path.splitext(path.lower())
    compression = None
    if ext[1:] in compressions and ext != ".zip":
        compression = infer_compression(path)
        stem, ext = os.path.splitext(stem)
    return (ext if ext in FILE_READERS else None), compression


def _reader(name: str, split: str, select: DocumentColumn, bad: BadRows) -> Iterator[Row | None]:
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
        return _read_files(fs, files, name, split, select, bad)
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
        return _read_files(fs, files, name, split, select, bad)
    if fs.isfile(path):
        return _read_files(fs, [path], name, split, select, bad)
    if "://" not in name and _HUB_ID.fullmatch(name) and _format(name)[0] is None:
        return _read_hub(name, split, select, bad)
    raise DataError(
        f"dataset {name!r} not found: no such file or directory",
        hint="check the path (globs are allowed, e.g. 'data/*.jsonl'), or pass a hub dataset id",
    )


def _hidden(relative_path: str, prefixes: str) -> bool:
    """Whether a file or a folder on its path is hidden: dotfiles for globs, as a shell does;
    for a directory also "_" names (Spark's _SUCCESS, _metadata)."""
    return any(part[:1] in prefixes for part in relative_path.split("/") if part)


def _supported() -> str:
    return "/".join(sorted(FILE_READERS))


def _read_files(
    fs: AbstractFileSystem,
    files: list[str],
    name: str,
    split: str,
    select: DocumentColumn,
    bad: BadRows,
) -> Iterator[Row | None]:
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
        read_file(FILE_READERS[fmt], fs, path, compression, select, where, bad)
        for where, path, fmt, compression in plan
        if fmt is not None
    )


def _import_datasets(name: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"reading {name!r} needs the 'datasets' package",
            hint="pip install 'kdcache[datasets]'",
        ) from e
    return datasets


def _read_saved(url: str, split: str, select: DocumentColumn) -> Iterator[Row | None]:
    datasets = _import_datasets(url)
    ds = datasets.load_from_disk(url)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{url!r} has no split {split!r} (splits: {listing(ds.keys())})",
                hint="pass --split with one of them",
            )
        ds = ds[split]
    elif split != "train" and str(ds.split) != split:
        raise DataError(
            f"{url!r} holds one dataset (split {str(ds.split)!r}), not split {split!r}",
            hint="keep --split train, or save a DatasetDict with that split",
        )
    col = select.column(ds.column_names, url)
    values = (
        value
        for batch in ds.select_columns([col]).iter(batch_size=_READ_BATCH)
        for value in batch[col]
    )
    return (Row(col, value, f"{url} row {i}") for i, value in enumerate(values))


def _read_hub(name: str, split: str, select: DocumentColumn, bad: BadRows) -> Iterator[Row | None]:
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
    return _hub_rows(ds, name, select, bad)


def _hub_rows(
    ds: Iterator[dict[str, Any]], name: str, select: DocumentColumn, bad: BadRows
) -> Iterator[Row | None]:
    """A streamed dataset's rows, whose columns may differ from row to row."""
    for i, row in enumerate(ds):
        where = f"{name} row {i}"
        try:
            col = select.row_column(row, where)
        except DataError as e:
            bad.row(e)
            yield None
            continue
        yield Row(col, row[col], where)
