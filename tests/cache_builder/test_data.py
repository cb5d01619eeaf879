"""cache_builder.data: every source gives the same documents; windows and packing keep every token
once, in order, without crossing a document; errors say what to fix."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers.processors import TemplateProcessing

from cache_builder.data import (
    IGNORE_INDEX,
    BadRows,
    DataError,
    PackedBatch,
    Segment,
    load_rows,
    pack,
    segments,
    tokenize_rows,
)
from cache_builder.tokenizer import TokenizerError, load_tokenizer
from schemas.errors import ConfigError, KdcacheError
from tests.fixtures.models import EOS, make_tokenizer
from tests.fixtures.text import TextDatasetFiles


@pytest.fixture(scope="module")
def tokenizer(local_tokenizer_dir: Path) -> Any:
    tok, notes = load_tokenizer(str(local_tokenizer_dir))
    assert notes == []
    return tok


def documents(
    dataset: Any,
    tok: Any,
    *,
    split: str = "train",
    text_field: str = "text",
    chat_template: bool = False,
) -> list[tuple[int, list[int]]]:
    rows = load_rows(dataset, split=split, text_field=text_field, chat_template=chat_template)
    docs = tokenize_rows(rows, tok, text_field=text_field, chat_template=chat_template)
    out = []
    for row, ids in docs:
        assert ids.dtype == np.int32 and ids.ndim == 1
        out.append((row, ids.tolist()))
    return out


def expected(tok: Any, texts: list[str] | tuple[str, ...]) -> list[tuple[int, list[int]]]:
    """GPT-2 style framing: no BOS by default, EOS appended."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [(i, [*doc, tok.eos_token_id]) for i, doc in enumerate(ids)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sources


def test_every_format_gives_the_same_token_stream(
    text_dataset_files: TextDatasetFiles, tokenizer: Any
) -> None:
    want = expected(tokenizer, text_dataset_files.documents)
    assert all(ids[-1] == tokenizer.eos_token_id for _, ids in want)
    for name, path in text_dataset_files.files.items():
        assert documents(str(path), tokenizer) == want, name


def test_rows_are_projected_to_the_document_column(
    text_dataset_files: TextDatasetFiles,
) -> None:
    for name, path in text_dataset_files.files.items():
        rows = list(load_rows(str(path)))
        assert [r for r, _ in rows] == list(range(len(text_dataset_files.documents))), name
        assert [row for _, row in rows] == [{"text": d} for d in text_dataset_files.documents]


def test_globs_and_directories_read_supported_files_in_sorted_order(
    tmp_path: Path, tokenizer: Any
) -> None:
    root = tmp_path / "shards"
    (root / "sub").mkdir(parents=True)
    write_jsonl(root / "part-b.jsonl", [{"text": "b0"}, {"text": "b1"}])
    write_jsonl(root / "part-a.jsonl", [{"text": "a0"}])
    write_jsonl(root / "sub" / "part-c.jsonl", [{"text": "c0"}])
    write_jsonl(root / ".hidden.jsonl", [{"text": "hidden"}])
    (root / "_SUCCESS").write_text("")
    (root / "README.md").write_text("# not data\n")

    texts = lambda ds: [row["text"] for _, row in load_rows(ds)]  # noqa: E731
    assert texts(str(root / "part-*.jsonl")) == ["a0", "b0", "b1"]
    assert texts(str(root / "**" / "*.jsonl")) == ["a0", "b0", "b1", "c0"]
    assert texts(str(root)) == ["a0", "b0", "b1", "c0"]
    assert [r for r, _ in load_rows(str(root))] == [0, 1, 2, 3]
    assert texts([str(root / "sub" / "part-c.jsonl"), str(root / "part-a.jsonl")]) == ["c0", "a0"]
    assert texts(str(root) + "/") == ["a0", "b0", "b1", "c0"]
    with pytest.raises(DataError, match=r"README\.md.*not a supported data file"):
        load_rows(str(root / "*"))  # at once, before any file is read


def test_fsspec_url(tokenizer: Any) -> None:
    fs = fsspec.filesystem("memory")
    root = "memory://kdcache-test-data"
    try:
        with fs.open(f"{root}/docs.jsonl", "w") as f:
            f.write('{"text": "over the wire"}\n{"text": "second"}\n')
        assert documents(f"{root}/docs.jsonl", tokenizer) == expected(
            tokenizer, ["over the wire", "second"]
        )
        assert documents(f"{root}/*.jsonl", tokenizer) == expected(
            tokenizer, ["over the wire", "second"]
        )
    finally:
        fs.rm(root, recursive=True)


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"text": "one"}, {"text": "two"}])
    assert [row for _, row in load_rows(str(path))] == [{"text": "one"}, {"text": "two"}]


def test_txt_documents_are_blocks_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "blocks.txt"
    path.write_bytes(b"\n\nfirst line\r\nsecond line\r\n\r\n  \t \n\n  indented\nlast")
    assert [row for _, row in load_rows(str(path))] == [
        {"text": "first line\nsecond line"},
        {"text": "  indented\nlast"},
    ]
    # the document goes under --text-field, whatever its name
    assert next(load_rows(str(path), text_field="body"))[1] == {"body": "first line\nsecond line"}


def test_saved_dataset_dict_picks_the_split(
    text_dataset_files: TextDatasetFiles, tokenizer: Any
) -> None:
    got = documents(str(text_dataset_files.disk), tokenizer, split="validation")
    assert got == expected(tokenizer, text_dataset_files.documents[:2])
    with pytest.raises(DataError, match=r"no split 'test' \(splits: 'train', 'validation'\)"):
        load_rows(str(text_dataset_files.disk), split="test")


def test_files_hold_only_the_train_split(text_dataset_files: TextDatasetFiles) -> None:
    with pytest.raises(DataError, match=r"one split, 'train'.*--split 'validation'"):
        load_rows(str(text_dataset_files.jsonl), split="validation")


def test_hub_ids_stream_through_load_dataset(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    import datasets

    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_load_dataset(path: str, **kwargs: Any) -> Any:
        calls.append((path, kwargs))
        return iter([{"text": "from the hub", "id": 0}, {"text": "again", "id": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = documents("someorg/some-dataset", tokenizer, split="validation")
    assert calls == [("someorg/some-dataset", {"split": "validation", "streaming": True})]
    assert got == expected(tokenizer, ["from the hub", "again"])


def test_unreachable_hub_id_says_both_what_was_tried_and_how_to_fix() -> None:
    # tests run with HF_DATASETS_OFFLINE=1: the real load_dataset fails at once
    with pytest.raises(DataError) as err:
        load_rows("kdcache-test/no-such-dataset")
    message = str(err.value)
    assert "'kdcache-test/no-such-dataset' is not a local file or directory" in message
    assert "hub" in message and "Fix:" in message


# ----------------------------------------------------------------------------- errors


def test_missing_paths(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl.*not found.*Fix: check the path") as err:
        load_rows(missing)
    assert isinstance(err.value, ValueError) and isinstance(err.value, KdcacheError)
    with pytest.raises(DataError, match=r"no files match .*\*\.parquet"):
        load_rows(str(tmp_path / "*.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"holds no data files.*save_to_disk"):
        load_rows(str(tmp_path / "empty_dir"))


def test_empty_datasets(tmp_path: Path, tokenizer: Any) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl' has no rows"):
        list(load_rows(str(empty)))

    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    docs = tokenize_rows(load_rows(str(blank)), tokenizer)
    with pytest.raises(DataError, match=r"blank\.jsonl holds no documents.*--text-field"):
        list(segments(docs, 16, source=str(blank)))


def test_missing_text_field_lists_the_columns(
    tmp_path: Path, text_dataset_files: TextDatasetFiles
) -> None:
    path = write_jsonl(tmp_path / "other.jsonl", [{"body": "hello", "id": 1}])
    with pytest.raises(
        DataError,
        match=r"other\.jsonl:1 has no 'text' column \(columns: 'body', 'id'\).*--text-field",
    ):
        list(load_rows(str(path)))
    assert list(load_rows(str(path), text_field="body")) == [(0, {"body": "hello"})]
    for fmt in ("parquet", "csv", "disk"):
        with pytest.raises(DataError, match=r"no 'content' column \(columns: 'id', 'text'\)"):
            list(load_rows(str(text_dataset_files.files[fmt]), text_field="content"))


def test_chat_template_needs_messages(text_dataset_files: TextDatasetFiles) -> None:
    with pytest.raises(DataError, match=r"no 'messages' column.*--chat-template.*'id', 'text'"):
        list(load_rows(str(text_dataset_files.parquet), chat_template=True))
    with pytest.raises(DataError, match=r"text file.*no 'messages'"):
        list(load_rows(str(text_dataset_files.txt), chat_template=True))


def test_tokenizer_without_chat_template_or_eos() -> None:
    rows = [(0, {"messages": [{"role": "user", "content": "hi"}]})]
    plain = make_tokenizer(384)
    with pytest.raises(TokenizerError, match=r"no chat template.*Fix: .*chat_template"):
        tokenize_rows(rows, plain, chat_template=True)
    plain.eos_token = None
    with pytest.raises(TokenizerError, match=r"no eos_token.*Fix:"):
        tokenize_rows(rows, plain)


def test_bad_values_name_the_row(tmp_path: Path, tokenizer: Any) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        list(load_rows(str(bad_json)))
    with pytest.raises(DataError, match=r"row 0: 'text' is int \(5\), not a string"):
        list(tokenize_rows([(0, {"text": 5})], tokenizer))
    with pytest.raises(DataError, match=r"row 3: 'messages' is not a list"):
        list(tokenize_rows([(3, {"messages": "hi"})], tokenizer, chat_template=True))


def rows_of(path: Path, **kwargs: Any) -> list[tuple[int, Any]]:
    return [(n, dict(row)) for n, row in load_rows(str(path), **kwargs)]


def test_invalid_utf8_names_the_file_line_and_byte(tmp_path: Path) -> None:
    cases = {
        "a.jsonl": b'{"text": "one"}\n\n{"text": "caf\xe9"}\n',
        "a.txt": b"one\n\ntwo\nthr\xffee\n",
        "a.csv": b'text\none\n"multi\nline \xe9"\n',
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError, match=r":[34] is not valid UTF-8 \(byte 0x(e9|ff) at") as e:
            list(load_rows(str(path)))
        assert str(path) in str(e.value) and "--skip-bad-rows" in str(e.value)
    bad = BadRows(skip=True)
    assert rows_of(tmp_path / "a.txt", bad_rows=bad) == [(0, {"text": "one"})]
    assert (bad.rows, bad.files) == (1, 0) and bad.first is not None
    assert f"{tmp_path / 'a.txt'}:4" in bad.first


def test_a_header_that_is_not_utf8_is_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_bytes(b"t\xe9xt\nfine\n")
    with pytest.raises(DataError, match=r"h\.csv:1 is not valid UTF-8"):
        list(load_rows(str(path)))
    bad = BadRows(skip=True)
    with pytest.raises(DataError, match=r"has no rows"):
        list(load_rows(str(path), bad_rows=bad))
    assert (bad.rows, bad.files) == (0, 1)


def test_skipped_rows_keep_their_numbers(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n[1]\n{"text": 7}\n{"text": null}\n{"text": "b"}\n')
    bad = BadRows(skip=True)
    docs = list(tokenize_rows(load_rows(str(path), bad_rows=bad), tokenizer, bad_rows=bad))
    assert [n for n, _ in docs] == [0, 3, 4]  # row 1 (not an object) and 2 (a number) left out
    assert docs[1][1].size == 0  # null: an empty document
    assert (bad.rows, bad.files) == (2, 0)
    assert bad.report().startswith(f"skipped 2 bad rows (--skip-bad-rows; first: {path}:2 ")


def test_every_non_string_text_is_refused_naming_the_file_and_line(
    tmp_path: Path, tokenizer: Any
) -> None:
    for value, kind in ((0, "int"), (False, "bool"), (1.5, "float"), ({"a": 1}, "dict")):
        path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": value}])
        with pytest.raises(DataError, match=rf"t\.jsonl:2: 'text' is {kind} \(.*\), not a string"):
            list(tokenize_rows(load_rows(str(path)), tokenizer))
    nulls = write_jsonl(tmp_path / "n.jsonl", [{"text": None}, {"text": ""}, {"text": "x"}])
    assert [ids.size > 0 for _, ids in tokenize_rows(load_rows(str(nulls)), tokenizer)] == [
        False,
        False,
        True,
    ]


def test_lone_surrogates_and_ragged_ids_name_the_row(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "x\\udfff"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl:2: 'text' holds a lone surrogate \(U\+DFFF\)"):
        list(tokenize_rows(load_rows(str(path)), tokenizer))
    for ids in ([[1, 2], [3]], [[1], [2]], "1 2", 7, [1.0], [True]):
        path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": ids}])
        with pytest.raises(DataError, match=r"ids\.jsonl:1: 'input_ids' is not a flat list"):
            list(tokenize_rows(load_rows(str(path)), tokenizer))
    parquet = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2], [1, 999]]}), parquet)
    with pytest.raises(DataError, match=r"ids\.parquet row 1: 'input_ids' holds ids in"):
        list(tokenize_rows(load_rows(str(parquet)), tokenizer))


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    import gzip

    lines = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3000)).encode()
    packed = gzip.compress(lines)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz is corrupt or cut short after \d+ rows"):
        list(load_rows(str(cut)))
    bad = BadRows(skip=True)
    kept = rows_of(cut, bad_rows=bad)
    assert 0 < len(kept) < 3000 and (bad.rows, bad.files) == (0, 1)
    assert [row["text"] for _, row in kept] == [f"row {i}" for i in range(len(kept))]

    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), parquet)
    parquet.write_bytes(parquet.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"p\.parquet is corrupt or cut short after 0 rows"):
        list(load_rows(str(parquet)))
    array = tmp_path / "a.json"
    array.write_bytes(b'[{"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"a\.json is not valid UTF-8 \(byte 0xe9 at byte 14\)"):
        list(load_rows(str(array)))


def test_csv_records_must_have_the_header_s_fields(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text('text,id\n"a, b",1\na, b,2\nc\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"r\.csv:3 has 3 fields, the header 2"):
        list(load_rows(str(path)))
    bad = BadRows(skip=True)
    assert rows_of(path, bad_rows=bad) == [(0, {"text": "a, b"})]
    assert bad.rows == 2


def test_max_rows_reads_no_further(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert rows_of(path, max_rows=2) == [(0, {"text": "a"}), (1, {"text": "b"})]
    bad = BadRows(skip=True)
    assert rows_of(path, max_rows=3, bad_rows=bad) == [(0, {"text": "a"}), (1, {"text": "b"})]
    assert bad.rows == 1


def test_all_rows_bad_says_so(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "all.jsonl", [{"text": 1}, {"text": 2}])
    bad = BadRows(skip=True)
    docs = tokenize_rows(load_rows(str(path), bad_rows=bad), tokenizer, bad_rows=bad)
    with pytest.raises(DataError, match=r"no documents.*skipped 2 bad rows"):
        list(segments(docs, 16, source=str(path), bad_rows=bad))


# ----------------------------------------------------------------------------- framing


def test_chat_template_rendering(tmp_path: Path, tokenizer: Any) -> None:
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
        [],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    rows = [{"messages": c, "text": "ignored"} for c in conversations]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", rows)
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)

    rendered = tokenizer.apply_chat_template(conversations[0], tokenize=False)
    assert rendered == "<|user|>What is 2+2?\n<|assistant|>4.\n"
    want = []
    for i, c in enumerate(conversations):
        text = tokenizer.apply_chat_template(c, tokenize=False) if c else ""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        want.append((i, [*ids, tokenizer.eos_token_id] if ids else []))
    assert documents(str(jsonl), tokenizer, chat_template=True) == want
    assert documents(str(parquet), tokenizer, chat_template=True) == want


def test_bos_is_added_once_when_the_tokenizer_adds_one(tmp_path: Path) -> None:
    tok = make_tokenizer(384)
    bos = tok.convert_tokens_to_ids(EOS)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, bos)]
    )
    assert tok("a")["input_ids"][0] == bos  # adds BOS by default, like Llama
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    body = tok("hello there", add_special_tokens=False)["input_ids"]

    rows = [(0, {"text": "hello there"}), (1, {"text": f"{EOS}hello there"})]
    assert [ids.tolist() for _, ids in tokenize_rows(rows, tok)] == [
        [bos, *body, tok.eos_token_id]
    ] * 2
    chat = [(0, {"messages": [{"role": "user", "content": "hello there"}]})]
    ((_, ids),) = tokenize_rows(chat, tok, chat_template=True)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert ids.tolist()[:1] == [bos] and ids.tolist().count(bos) == 2  # one BOS, one EOS
    assert ids.tolist()[-1 - len(newline) : -1] == newline


def test_pretokenized_input_ids_are_used_as_is(tmp_path: Path, tokenizer: Any) -> None:
    parquet = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[5, 6, 7], [8], []]}), parquet)
    assert documents(str(parquet), tokenizer) == [(0, [5, 6, 7]), (1, [8]), (2, [])]

    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "abc", "input_ids": [1, 2]}])
    assert documents(str(both), tokenizer) == expected(tokenizer, ["abc"])  # text wins
    assert documents(str(both), tokenizer, text_field="input_ids") == [(0, [1, 2])]

    csv_path = tmp_path / "ids.csv"
    csv_path.write_text('input_ids\n"[3, 4]"\n', encoding="utf-8")
    assert documents(str(csv_path), tokenizer) == [(0, [3, 4])]

    with pytest.raises(DataError, match=r"row 0: 'input_ids' holds ids in \[0, 384\].*\[0, 384\)"):
        list(tokenize_rows([(0, {"input_ids": [0, 384]})], tokenizer))
    with pytest.raises(DataError, match=r"row 0: 'input_ids' is not a flat list of integers"):
        list(tokenize_rows([(0, {"input_ids": ["a", "b"]})], tokenizer))


def test_tokenize_rows_streams(tokenizer: Any) -> None:
    endless = ((i, {"text": f"document {i}"}) for i in itertools.count())
    first = list(itertools.islice(tokenize_rows(endless, tokenizer, batch_size=4), 10))
    assert [row for row, _ in first] == list(range(10))
    want = expected(tokenizer, [f"document {i}" for i in range(10)])
    assert [(row, ids.tolist()) for row, ids in first] == want


# ----------------------------------------------------------------------------- windows


def test_long_documents_are_cut_into_windows() -> None:
    docs = [
        (0, np.arange(10, dtype=np.int32)),
        (1, np.zeros(0, dtype=np.int32)),
        (2, np.arange(100, 104, dtype=np.int32)),
    ]
    got = list(segments(docs, 4))
    assert [(s.source_row, s.source_start, s.input_ids.tolist()) for s in got] == [
        (0, 0, [0, 1, 2, 3]),
        (0, 4, [4, 5, 6, 7]),
        (0, 8, [8, 9]),
        (2, 0, [100, 101, 102, 103]),
    ]
    assert all(s.input_ids.dtype == np.int32 for s in got)
    with pytest.raises(ConfigError, match="--max-length"):
        segments(docs, 0)


def test_the_long_fixture_document_round_trips_through_windows(
    text_dataset_files: TextDatasetFiles, tokenizer: Any
) -> None:
    docs = documents(str(text_dataset_files.jsonl), tokenizer)
    max_length = 64
    windows = list(segments(((r, np.asarray(ids, np.int32)) for r, ids in docs), max_length))
    assert max(len(w) for w in windows) == max_length  # the long document needs several
    for row, ids in docs:
        mine = [w for w in windows if w.source_row == row]
        assert [w.source_start for w in mine] == list(range(0, len(ids), max_length))
        assert np.concatenate([w.input_ids for w in mine]).tolist() == ids


# ----------------------------------------------------------------------------- packing


def random_segments(rng: np.random.Generator, n_docs: int, max_length: int) -> list[Segment]:
    docs = []
    for row in range(n_docs):
        n = int(rng.choice([0, 1, 2, int(rng.integers(1, 3 * max_length))]))
        docs.append((row, rng.integers(1, 1000, size=n).astype(np.int32)))
    return list(segments(docs, max_length))


def check_batch(batch: PackedBatch, max_length: int, rows: int, pad_id: int) -> None:
    b, length = batch.input_ids.shape
    assert 1 <= b <= rows and length <= max_length
    for arr in (batch.input_ids, batch.position_ids, batch.labels):
        assert arr.dtype == np.int64 and arr.shape == (b, length)
    assert len(batch.seq_lens) == b
    assert length == max(sum(lens) for lens in batch.seq_lens)
    assert [len(s) for s in batch.segments] == [n for lens in batch.seq_lens for n in lens]
    assert batch.num_tokens == sum(len(s) for s in batch.segments)
    segs = iter(batch.segments)
    for r, lens in enumerate(batch.seq_lens):
        t = 0
        for n in lens:
            seg = next(segs)
            ids = seg.input_ids
            assert batch.input_ids[r, t : t + n].tolist() == ids.tolist()
            assert batch.position_ids[r, t : t + n].tolist() == list(range(n))
            assert batch.labels[r, t : t + n - 1].tolist() == ids[1:].tolist()
            assert batch.labels[r, t + n - 1] == IGNORE_INDEX  # never the next segment's token
            t += n
        assert (batch.input_ids[r, t:] == pad_id).all()
        assert (batch.labels[r, t:] == IGNORE_INDEX).all()
        assert (batch.position_ids[r, t:] == 0).all()


@pytest.mark.parametrize(("max_length", "rows"), [(1, 1), (8, 1), (16, 3), (64, 4)])
def test_packing_invariants(max_length: int, rows: int) -> None:
    rng = np.random.default_rng(max_length * 10 + rows)
    segs = random_segments(rng, 200, max_length)
    pad_id = 0
    batches = list(pack(iter(segs), max_length, pad_id=pad_id, rows_per_batch=rows))
    order = {id(s): i for i, s in enumerate(segs)}
    last = -1
    for i, batch in enumerate(batches):
        check_batch(batch, max_length, rows, pad_id)
        if i < len(batches) - 1:
            assert len(batch.seq_lens) == rows  # only the last batch may be short
        indices = [order[id(s)] for s in batch.segments]
        for row_indices in _split(indices, [len(lens) for lens in batch.seq_lens]):
            assert row_indices == sorted(row_indices)  # stream order within a row
        assert min(indices) > last  # and from one batch to the next
        last = max(indices)
    # every segment, hence every token, exactly once
    packed = sorted(order[id(s)] for b in batches for s in b.segments)
    assert packed == list(range(len(segs)))
    assert sum(b.num_tokens for b in batches) == sum(len(s) for s in segs)
    # deterministic
    again = list(pack(segs, max_length, pad_id=pad_id, rows_per_batch=rows))
    assert all(
        np.array_equal(a.input_ids, b.input_ids) and a.seq_lens == b.seq_lens
        for a, b in zip(batches, again, strict=True)
    )


def _split(items: list[int], sizes: list[int]) -> list[list[int]]:
    it = iter(items)
    return [list(itertools.islice(it, n)) for n in sizes]


def test_first_fit_packing() -> None:
    segs = [Segment(i, 0, np.full(n, i + 1, np.int32)) for i, n in enumerate([6, 6, 3, 4, 1, 9])]
    batches = list(pack(segs, 10, pad_id=99, rows_per_batch=2))
    assert [b.seq_lens for b in batches] == [[[6, 3, 1], [6, 4]], [[9]]]
    assert [[s.source_row for s in b.segments] for b in batches] == [[0, 2, 4, 1, 3], [5]]
    first = batches[0]
    assert first.input_ids.shape == (2, 10)
    assert first.input_ids[0].tolist() == [1] * 6 + [3] * 3 + [5]
    assert first.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    assert first.labels[0].tolist() == [1] * 5 + [-1] + [3] * 2 + [-1, -1]
    assert batches[1].input_ids.shape == (1, 9)  # L is the longest row of the batch


def test_pack_by_token_budget_and_bad_arguments() -> None:
    segs = [Segment(i, 0, np.ones(8, np.int32)) for i in range(5)]
    assert [len(b.seq_lens) for b in pack(segs, 8, pad_id=0, batch_tokens=20)] == [2, 2, 1]
    assert [len(b.seq_lens) for b in pack(segs, 8, pad_id=0, batch_tokens=3)] == [1] * 5
    with pytest.raises(ConfigError, match="exactly one"):
        pack(segs, 8, pad_id=0)
    with pytest.raises(ConfigError, match="exactly one"):
        pack(segs, 8, pad_id=0, rows_per_batch=2, batch_tokens=16)
    with pytest.raises(ConfigError, match="at least 1"):
        pack(segs, 8, pad_id=0, rows_per_batch=0)


def test_pack_streams() -> None:
    endless = (Segment(i, 0, np.ones(3, np.int32)) for i in itertools.count())
    batch = next(pack(endless, 8, pad_id=0, rows_per_batch=2))
    assert batch.seq_lens == [[3, 3], [3, 3]]
