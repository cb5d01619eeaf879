"""What a row of a dataset is to a build, and what becomes of a row that cannot be a document.

Readers (`cache_builder.formats`, `cache_builder.sources`) yield `Row`s: the one column a
document is read from, and where the row was read (`path:line`, `path row i`, `path[i]`), so
that a problem found later, while tokenising, still names the place to fix.

A bad row (undecodable bytes, invalid JSON, not an object, a missing column, a text that is
not a string, ragged `input_ids`, ...) and a bad file (corrupt, or cut short) go to one
`BadRows`. By default the first one stops the build with its `DataError`, one line naming the
file and row. With --skip-bad-rows it is left out and counted: a bad row keeps its `source_row`
number (later rows keep theirs), and a bad file keeps the rows read before the damage. Which
rows are bad depends only on the bytes of the data, so the token stream, hence the dataset
fingerprint and a resumed build, stay the same from run to run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.errors import KdcacheError

__all__ = [
    "BadRows",
    "DataError",
    "DocumentColumn",
    "Row",
    "skippable",
    "text_of",
    "token_ids",
    "unicode_text",
]

SKIP_ROWS = "or pass --skip-bad-rows to leave such rows out (they are counted)"
SKIP_FILE = "or pass --skip-bad-rows to keep the rows before the damage and leave the rest out"
_SURROGATE = re.compile("[\ud800-\udfff]")
_NO_IDS = np.zeros(0, dtype=np.int32)


class DataError(KdcacheError, ValueError):
    """The dataset cannot be read as asked: missing, empty, or without the needed column."""


def skippable(message: str, fix: str, *, file: bool = False) -> DataError:
    """A `DataError` for a bad row (or, with `file`, a bad file) whose fix also names
    --skip-bad-rows."""
    return DataError(message, hint=f"{fix}; {SKIP_FILE if file else SKIP_ROWS}")


class Row(dict[str, Any]):
    """A row as a reader gives it: `{column: value}` for its document's column, and `where` it
    was read, for the errors found after reading."""

    __slots__ = ("where",)

    def __init__(self, column: str, value: Any, where: str) -> None:
        super().__init__({column: value})
        self.where = where


@dataclass
class BadRows:
    """Stop at the first bad row or file (`skip` False), or skip and count them (--skip-bad-rows).

    One instance follows one pass over the data: readers report bad files and rows, the
    tokeniser bad values, and the build reports the counts.
    """

    skip: bool = False
    rows: int = 0
    """Rows left out."""
    files: int = 0
    """Files whose rest was left out (they were corrupt or cut short)."""
    first: str | None = None
    """What was wrong with the first thing left out, naming its file and row."""

    def row(self, error: DataError) -> None:
        """A row that cannot be a document: raise `error`, or count it when skipping."""
        self._note(error)
        self.rows += 1

    def file(self, error: DataError) -> None:
        """A file that cannot be read on: raise `error`, or count it when skipping."""
        self._note(error)
        self.files += 1

    def _note(self, error: DataError) -> None:
        if not self.skip:
            raise error
        if self.first is None:
            self.first = error.message

    def report(self) -> str:
        """For the summary: 'skipped N bad rows and the unreadable rest of M files (first:
        ...)', or "" when nothing was skipped."""
        parts = []
        if self.rows:
            parts.append(f"{self.rows} bad row{'s' if self.rows != 1 else ''}")
        if self.files:
            parts.append(
                f"the unreadable rest of {self.files} file{'s' if self.files != 1 else ''}"
            )
        if not parts:
            return ""
        return f"skipped {' and '.join(parts)} (--skip-bad-rows; first: {self.first})"


# ----------------------------------------------------------------------------- values


def text_of(value: Any, col: str, where: str) -> str:
    """A row's text: a string, or "" for None (an empty document); anything else is bad, be it
    `0` or `false`, which are as much not a text as `123`."""
    if value is None:
        return ""
    if not isinstance(value, str):
        shown = repr(value)
        raise skippable(
            f"{where}: {col!r} is {type(value).__name__} "
            f"({shown if len(shown) <= 40 else shown[:37] + '...'}), not a string",
            "write the text as a string, or pass --text-field with a text column",
        )
    return value


def unicode_text(text: str, col: str, where: str) -> str:
    """`text`, unless it holds a lone surrogate: not Unicode, so no tokenizer takes it (a JSON
    "\\ud800" escape without its pair gives one)."""
    if bad := _SURROGATE.search(text):
        raise skippable(
            f"{where}: {col!r} holds a lone surrogate (U+{ord(bad.group()):04X}) at character "
            f"{bad.start() + 1}, which is not Unicode text",
            "fix the text (e.g. a JSON \\ud800 escape without its pair)",
        )
    return text


def token_ids(value: Any, vocab: int, where: str) -> np.ndarray:
    """A row's pre-tokenised ids as (n,) int32: one flat list of integers in [0, vocab)."""
    if value is None:
        return _NO_IDS
    what = type(value).__name__
    try:
        ids = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    except ValueError:
        ids, what = None, "ragged nested lists"
    if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        what = f"dtype {ids.dtype}, shape {ids.shape}" if ids is not None else what
        raise skippable(
            f"{where}: 'input_ids' is not a flat list of integers ({what})",
            "store one list of token ids per row",
        )
    if ids.size == 0:
        return _NO_IDS
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise skippable(
            f"{where}: 'input_ids' holds ids in [{lo}, {hi}], outside the tokenizer's "
            f"vocabulary [0, {vocab})",
            "tokenise the data with the teacher's tokenizer, or pass --text-field to "
            "tokenise a text column instead",
        )
    return ids.astype(np.int32)


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
                f"(columns: {listing(cols)})",
                hint="give a 'messages' column of [{'role': ..., 'content': ...}] lists, "
                "or drop --chat-template to tokenise --text-field",
            )
        if self.text_field in cols:
            return self.text_field
        if "input_ids" in cols:
            return "input_ids"
        raise DataError(
            f"{where} has no {self.text_field!r} column (columns: {listing(cols)})",
            hint="pass --text-field with the column that holds the text, add a pre-tokenised "
            "'input_ids' column, or use --chat-template for a 'messages' column",
        )

    def row_column(self, row: dict[str, Any], where: str) -> str:
        """`column` for one row of a file whose rows may differ (JSON): a missing column there
        makes a bad row, which --skip-bad-rows can leave out."""
        try:
            return self.column(row, where)
        except DataError as e:
            raise skippable(e.message, e.hint or "") from None


def listing(cols: Iterable[str]) -> str:
    return ", ".join(repr(c) for c in sorted(cols)) or "none"
