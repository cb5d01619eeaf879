"""How each data file becomes rows, and what makes a row or a whole file bad.

Formats: .jsonl/.ndjson (one object per line), .json (JSON lines, or one array of objects,
parsed whole), .parquet, .csv (a header line, then one record per row) and .txt (one document
per block of lines; blocks are separated by blank lines, a block's lines joined with "\\n"),
each optionally .gz/.bz2/.xz compressed. Text files are UTF-8 (a leading byte-order mark is
dropped).

Rows are numbered by `cache_builder.sources`; a reader yields each row as a `Row`, or None for a
bad row that `BadRows` skipped (its number stays taken). A bad row: a line (or csv record, or
txt block) that is not valid UTF-8, a JSON line that is invalid or not an object or lacks the
column, a csv record with more or fewer fields than the header, a csv `messages`/`input_ids`
cell that is not JSON. A bad file: one whose decompression or parquet decoding fails (corrupt,
cut short, empty), a .json array that is not valid JSON or UTF-8, a csv header that is not
UTF-8; the rows before the damage are kept.
"""

from __future__ import annotations

import csv
import itertools
import json
import lzma
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from fsspec.spec import AbstractFileSystem

from cache_builder.rows import BadRows, DataError, DocumentColumn, Row, skippable

__all__ = ["FILE_READERS", "read_file"]

_READ_BATCH = 1024  # rows per record batch read from parquet
_ESCAPED = re.compile("[\udc80-\udcff]")  # an undecodable byte b, read with surrogateescape
_FIX_UTF8 = "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)"
_FIX_FILE = "restore or re-create the file"

Reader = Callable[
    [AbstractFileSystem, str, str | None, DocumentColumn, str, BadRows], Iterator[Row | None]
]
"""(fs, path, compression, select, where, bad) -> the file's rows, None for a skipped one."""


def read_file(
    reader: Reader,
    fs: AbstractFileSystem,
    path: str,
    compression: str | None,
    select: DocumentColumn,
    where: str,
    bad: BadRows,
) -> Iterator[Row | None]:
    """`reader`'s rows of one file; a file found corrupt or cut short goes to `bad` as a file."""
    read = 0
    try:
        for row in reader(fs, path, compression, select, where, bad):
            read += 1
            yield row
    except OSError as e:  # gzip's BadGzipFile, bz2's invalid data, parquet's corrupt pages
        if e.errno is not None:  # the disk or the store failing, not the data: never skipped
            raise
        bad.file(_damaged(where, read, e))
    except (EOFError, zlib.error, lzma.LZMAError, pa.ArrowException, UnicodeDecodeError) as e:
        bad.file(_damaged(where, read, e))  # cut short; corrupt; a parquet string not UTF-8


def _damaged(where: str, rows: int, e: BaseException) -> DataError:
    return skippable(
        f"{where} is corrupt or cut short after {rows} rows ({type(e).__name__}: {e})",
        _FIX_FILE,
        file=True,
    )


class _Lines:
    """A text file's lines, counted, noting the first line since `invalid` was last reset that
    is not valid UTF-8 (the file is read with surrogateescape: byte b becomes U+DC00+b)."""

    def __init__(self, f: Any, where: str) -> None:
        self._f, self._where = f, where
        self.number = 0
        self.invalid: DataError | None = None

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line: str = next(self._f)
        self.number += 1
        if self.invalid is None and (m := _ESCAPED.search(line)):
            self.invalid = skippable(
                f"{self._where}:{self.number} is not valid UTF-8 (byte "
                f"0x{ord(m.group()) - 0xDC00:02x} at character {m.start() + 1})",
                _FIX_UTF8,
            )
        return line


def _open_text(
    fs: AbstractFileSystem, path: str, compression: str | None, newline: str | None = None
) -> Any:
    return fs.open(
        path,
        "rt",
        compression=compression,
        encoding="utf-8-sig",
        errors="surrogateescape",
        newline=newline,
    )


def _read_jsonl(
    fs: AbstractFileSystem,
    path: str,
    compression: str | None,
    select: DocumentColumn,
    where: str,
    bad: BadRows,
) -> Iterator[Row | None]:
    with _open_text(fs, path, compression) as f:
        lines = _Lines(f, where)
        for line in lines:
            if not line.strip():
                continue
            try:
                yield _json_row(line, select, f"{where}:{lines.number}", lines.invalid)
            except DataError as e:
                bad.row(e)
                yield None
            lines.invalid = None


def _json_row(line: str, select: DocumentColumn, where: str, invalid: DataError | None) -> Row:
    if invalid is not None:
        raise invalid
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise skippable(f"{where} is not valid JSON ({e})", "write one JSON object per line") from e
    return _project(row, select, where)


def _project(row: Any, select: DocumentColumn, where: str) -> Row:
    if not isinstance(row, dict):
        raise skippable(
            f"{where} is a JSON {type(row).__name__}, not an object",
            'write one object per row, e.g. {"text": "..."}',
        )
    col = select.row_column(row, where)
    return Row(col, row[col], where)


def _read_json(
    fs: AbstractFileSystem,
    path: str,
    compression: str | None,
    select: DocumentColumn,
    where: str,
    bad: BadRows,
) -> Iterator[Row | None]:
    with _open_text(fs, path, compression) as f:
        head = ""
        while not head and (chunk := f.read(4096)):
            head = chunk.lstrip()
    if not head.startswith("["):  # JSON lines in a .json file, as `datasets` accepts them
        yield from _read_jsonl(fs, path, compression, select, where, bad)
        return
    with fs.open(path, "rb", compression=compression) as f:
        data = f.read()
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        byte = f"byte 0x{data[e.start]:02x} at byte {e.start}"
        bad.file(skippable(f"{where} is not valid UTF-8 ({byte})", _FIX_UTF8, file=True))
        return
    except json.JSONDecodeError as e:
        fix = "write an array of objects or JSON lines"
        bad.file(skippable(f"{where} is not valid JSON ({e})", fix, file=True))
        return
    for i, row in enumerate(rows):
        try:
            yield _project(row, select, f"{where}[{i}]")
        except DataError as e:
            bad.row(e)
            yield None


def _read_parquet(
    fs: AbstractFileSystem,
    path: str,
    compression: str | None,
    select: DocumentColumn,
    where: str,
    bad: BadRows,
) -> Iterator[Row | None]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb", compression=compression) as f:
        pf = pq.ParquetFile(f)
        col = select.column(pf.schema_arrow.names, where)
        count = itertools.count()
        for batch in pf.iter_batches(batch_size=_READ_BATCH, columns=[col]):
            for value in batch.column(0).to_pylist():
                yield Row(col, value, f"{where} row {next(count)}")


def _read_csv(
    fs: AbstractFileSystem,
    path: str,
    compression: str | None,
    select: DocumentColumn,
    where: str,
    bad: BadRows,
) -> Iterator[Row | None]:
    csv.field_size_limit(2**31 - 1)  # documents are longer than the 128 KiB default
    with _open_text(fs, path, compression, newline="") as f:
        lines = _Lines(f, where)
        reader = csv.reader(lines, strict=True)  # an unclosed quote is an error, not a field
        header = next(reader, None)
        if header is None:  # an empty file
            return
        if lines.invalid is not None:
            bad.file(skippable(lines.invalid.message, _FIX_UTF8, file=True))
            return
        col = select.column(header, where)
        index = len(header) - 1 - header[::-1].index(col)  # the last of equal names, as DictReader
        while True:
            start, lines.invalid = reader.line_num + 1, None
            try:
                record = next(reader, None)
                if record is None:
                    break
                if not record:  # a blank line
                    continue
                here = f"{where}:{start}"
                yield Row(col, _cell(record, header, index, col, here, lines), here)
            except (DataError, csv.Error) as e:
                bad.row(e if isinstance(e, DataError) else _csv_error(f"{where}:{start}", e))
                yield None


def _cell(
    record: list[str], header: list[str], index: int, col: str, where: str, lines: _Lines
) -> Any:
    if lines.invalid is not None:
        raise lines.invalid
    if len(record) != len(header):
        raise skippable(
            f"{where} has {len(record)} fields, the header {len(header)}",
            "quote fields that hold commas, quotes or line breaks",
        )
    value: Any = record[index]
    if col in ("messages", "input_ids"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise skippable(
                f"{where}: the {col!r} cell is not JSON ({e})", f"write {col!r} cells as JSON lists"
            ) from e
    return value


def _csv_error(where: str, e: csv.Error) -> DataError:
    return skippable(f"{where} is not a valid CSV record ({e})", "fix the record's quoting")


def _read_txt(
    fs: AbstractFileSystem,
    path: str,
    compression: str | None,
    select: DocumentColumn,
    where: str,
    bad: BadRows,
) -> Iterator[Row | None]:
    if select.chat_template:
        raise DataError(
            f"{where} is a text file: it has no 'messages' for --chat-template",
            hint="use jsonl or parquet with a 'messages' column, or drop --chat-template",
        )
    block: list[str] = []
    first = 0
    with _open_text(fs, path, compression) as f:
        lines = _Lines(f, where)
        for line in itertools.chain(lines, [""]):
            if line.strip():
                if not block:
                    first = lines.number
                block.append(line.rstrip("\r\n"))
            elif block:
                if lines.invalid is not None:
                    bad.row(lines.invalid)
                    yield None
                else:
                    yield Row(select.text_field, "\n".join(block), f"{where}:{first}")
                block, lines.invalid = [], None


FILE_READERS: dict[str, Reader] = {
    ".csv": _read_csv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}
"""The reader of each file extension (before a compression suffix)."""
