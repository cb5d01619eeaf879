"""Dataset -> documents -> windows -> packed rows: the input side of a build.

Each step is a generator, so a build holds about one batch in memory whatever the dataset size:

    load_rows(dataset)              (source_row, row)   files, a save_to_disk directory, a hub id
    tokenize_rows(rows, tokenizer)  (source_row, ids)   one document, framed by BOS/EOS
    segments(docs, max_length)      Segment             windows of at most max_length tokens
    pack(segments, max_length)      PackedBatch         (B, L) rows, several segments per row

The rules below decide the token stream, hence the dataset fingerprint of a cache:

- Sources, splits and rows: see `cache_builder.sources`.
- Columns. With `chat_template`, the `messages` column is rendered with the tokenizer's chat
  template. Otherwise `text_field` is tokenised; when a row has no such column but has
  `input_ids`, those ids are used as-is (`text_field="input_ids"` forces this). In CSV files,
  `messages` and `input_ids` cells hold JSON.
- Values. A text is a string; `null` (None), like "" or [], is an empty document (it keeps
  its row number and adds no tokens). Any other value is a bad row: a number or a boolean
  (`0` and `false` as much as `123`), a list, an object, a text holding a lone surrogate
  (not Unicode: tokenizers refuse it), `input_ids` that are not one flat list of integers of
  the tokenizer's vocabulary, `messages` that the chat template cannot render. A bad row stops
  the build naming its file and row, or with --skip-bad-rows is left out and counted
  (`cache_builder.rows`). A JSON row without the column is a bad row too (it is usually a
  wrong --text-field; write `null` for an empty document).
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

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cache_builder.rows import (
    BadRows,
    DataError,
    DocumentColumn,
    skippable,
    text_of,
    token_ids,
    unicode_text,
)
from cache_builder.sources import load_rows
from cache_builder.tokenizer import TokenizerError
from schemas.errors import ConfigError
from schemas.record import document_hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "BadRows",
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

_EMPTY = np.zeros(0, dtype=np.int32)


@dataclass(frozen=True, eq=False)
class Segment:
    """One window of one document (compared by identity: it holds an array)."""

    source_row: int
    """The row of the dataset the document came from (see `load_rows`)."""
    source_start: int
    """Offset of this window's first token within the document's token ids."""
    input_ids: np.ndarray
    """(n,) int32, 1 <= n <= max_length."""
    document_hash: int = 0
    """`schemas.record.document_hash` of the whole document (the content key of its windows)."""

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


# ----------------------------------------------------------------------------- tokens


def tokenize_rows(
    rows: Iterable[tuple[int, dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    chat_template: bool = False,
    batch_size: int = 256,
    bad_rows: BadRows | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Tokenise rows into documents (source_row, (n,) int32 ids), framed by BOS/EOS.

    Texts are tokenised `batch_size` rows at a time through the fast tokenizer. Every row gives
    one document, empty ones included (`segments` skips them), except a bad row that
    `bad_rows` skips. Errors name a row by its `where` (file and line) when it has one.

    Raises:
        TokenizerError: the tokenizer has no EOS, or no chat template with `chat_template`.
        DataError: (unless `bad_rows` skips it) a row lacks its column, or its value has the
            wrong type, a lone surrogate or out-of-range ids.
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
    select = DocumentColumn(text_field, chat_template)
    bad = bad_rows if bad_rows is not None else BadRows()
    return _tokenize(rows, tokenizer, select, bos, int(eos), batch_size, bad)


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
    select: DocumentColumn,
    bos: int | None,
    eos: int,
    batch_size: int,
    bad: BadRows,
) -> Iterator[tuple[int, np.ndarray]]:
    vocab = len(tokenizer)
    it = iter(rows)
    while chunk := list(itertools.islice(it, batch_size)):
        docs: list[np.ndarray | None] = [_EMPTY] * len(chunk)  # None: a skipped row
        texts: list[str] = []
        slots: list[int] = []
        for i, (source_row, row) in enumerate(chunk):
            where = getattr(row, "where", None) or f"row {source_row}"  # a `Row` knows its file
            try:
                doc = _document(row, tokenizer, select, vocab, where)
            except DataError as e:
                bad.row(e)
                docs[i] = None
                continue
            if isinstance(doc, str):
                texts.append(doc)
                slots.append(i)
            else:
                docs[i] = doc
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
            if ids is not None:
                yield source_row, ids


def _document(
    row: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    select: DocumentColumn,
    vocab: int,
    where: str,
) -> str | np.ndarray:
    """A row's text to tokenise (non-empty), or its ids; a skippable DataError for a bad row."""
    col = select.row_column(row, where)
    value = row[col]
    if col == "input_ids":
        return token_ids(value, vocab, where)
    text = _render(tokenizer, value, where) if col == "messages" else text_of(value, col, where)
    return unicode_text(text, col, where) or _EMPTY


def _render(tokenizer: PreTrainedTokenizerBase, messages: Any, where: str) -> str:
    if messages is None or (isinstance(messages, list) and not messages):
        return ""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise skippable(
            f"{where}: 'messages' is not a list of {{'role': ..., 'content': ...}} objects",
            "write each conversation as a list of role/content objects",
        )
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as e:
        raise skippable(
            f"{where}: the chat template rejected these messages: {e}",
            "fix the conversation (e.g. roles must alternate)",
        ) from e
    return str(text)


def _frame(ids: list[int], bos: int | None, eos: int) -> np.ndarray:
    if not ids:
        return _EMPTY
    head = [bos] if bos is not None and ids[0] != bos else []
    tail = [eos] if ids[-1] != eos else []
    return np.asarray(head + ids + tail, dtype=np.int32)


# ----------------------------------------------------------------------------- windows and rows


def segments(
    docs: Iterable[tuple[int, np.ndarray]],
    max_length: int,
    *,
    source: str = "the dataset",
    bad_rows: BadRows | None = None,
) -> Iterator[Segment]:
    """Cut documents into windows of at most `max_length` tokens; skip empty documents.

    Raises:
        ConfigError: max_length < 1.
        DataError: (when iterated to the end) no document had any token; `source` names it,
            and `bad_rows` what was skipped.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be at least 1, got {max_length}")
    return _windows(docs, max_length, source, bad_rows or BadRows())


def _windows(
    docs: Iterable[tuple[int, np.ndarray]], max_length: int, source: str, bad: BadRows
) -> Iterator[Segment]:
    any_tokens = False
    for source_row, ids in docs:
        key = document_hash(ids) if len(ids) else 0
        for start in range(0, len(ids), max_length):
            any_tokens = True
            yield Segment(source_row, start, ids[start : start + max_length], key)
    if not any_tokens:
        why = bad.report() or "every row was empty"
        raise DataError(
            f"{source} holds no documents after tokenisation ({why})",
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
