"""Content checks (`schemas.checks`) and what `validate` reports, naming where each problem lies.

Records that break one invariant each must give exactly the expected one-line problem, and
valid records (any layout, any encoding, the format-1.0 fixtures) none. Caches with bad content
are forged the way an attacker or a buggy producer would: the stored columns rewritten through
a shard writer and the manifest entry's size and checksum updated to match, so only the content
checks can tell.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.cache import CacheWriter, file_info, open_cache
from schemas.checks import FILL_MIN_TOKENS, check_records, check_records_deep
from schemas.encodings import ID_ENCODINGS, VALUE_ENCODINGS, TopkEncoding, default_encoding
from schemas.manifest import (
    BuildSettings,
    DatasetInfo,
    Manifest,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
)
from schemas.record import Layout, ShardRecords
from schemas.testing import layouts_and_lengths, random_records, stored
from schemas.validate import Problem, validate_cache
from tests.fixtures.forge import forge_shard, reseal_shard

LAYOUT = Layout(k=4, vocab_size=100, temperatures=(2.0,), num_samples=3, content_keys=True)
LENGTHS = [20, 11, 1, 0, 9, 14, 10, 12, 15]
N, S = sum(LENGTHS), len(LENGTHS)
ENCODING = default_encoding(LAYOUT.vocab_size)
OLD = Path(__file__).parents[1] / "fixtures" / "data"
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}'


def good() -> ShardRecords:
    """Valid records as a q8c cache hands them out, in arrays of their own to break."""
    r = stored(random_records(LAYOUT, LENGTHS, seed=3), LAYOUT, ENCODING)
    return dataclasses.replace(r, **{f.name: v.copy() for f, v in r.arrays()})


def row_with_label_outside_topk(r: ShardRecords) -> int:
    """A position (not a sequence's last) whose label is not in its top-k and whose ranks 1
    and 2 have distinct values."""
    for t in range(LENGTHS[0] - 1):
        distinct = r.topk_logprobs[t, 1] > r.topk_logprobs[t, 2]
        if r.input_ids[t + 1] not in r.topk_ids[t] and distinct:
            return t
    raise AssertionError("no such position")


def test_valid_records_pass() -> None:
    r = good()
    assert N >= FILL_MIN_TOKENS and S >= 8
    assert check_records(r, LAYOUT) == [] and check_records_deep(r, LAYOUT, ENCODING) == []


# -- the cheap checks: one invariant broken at a time -------------------------------------------

OUTSIDE = "positions hold ids outside the vocabulary [0, 100)"
NAN_OR_POSITIVE = "positions hold NaN or values > 0"


def _set(name: str, index: Any, value: Any) -> Callable[[ShardRecords], None]:
    def edit(r: ShardRecords) -> None:
        getattr(r, name)[index] = value

    return edit


CHEAP_CASES = {
    "input_ids >= V": (_set("input_ids", [3, 10], 100), f"input_ids: 2 of {N} {OUTSIDE}"),
    "input_ids < 0": (_set("input_ids", 0, -1), f"input_ids: 1 of {N} {OUTSIDE}"),
    "topk_ids >= V": (_set("topk_ids", (5, 2), 107), f"topk_ids: 1 of {N} {OUTSIDE}"),
    "sample_ids >= V": (_set("sample_ids", (7, 0), 1000), f"sample_ids: 1 of {N} {OUTSIDE}"),
    "topk NaN": (_set("topk_logprobs", (4, 1), np.nan), f"topk_logprobs: 1 of {N} {NAN_OR_POSITIVE}"),
    "topk > 0": (_set("topk_logprobs", ([6, 8], 0), 0.5), f"topk_logprobs: 2 of {N} {NAN_OR_POSITIVE}"),
    "log_tail NaN": (_set("log_tail", 2, np.nan), f"log_tail: 1 of {N} {NAN_OR_POSITIVE}"),
    "log_tail > 0": (_set("log_tail", 9, 0.1), f"log_tail: 1 of {N} {NAN_OR_POSITIVE}"),
    "sample_logprobs > 0": (_set("sample_logprobs", (1, 1), 3.0), f"sample_logprobs: 1 of {N} {NAN_OR_POSITIVE}"),
    "lse not finite": (_set("lse", [1, 2, 3], [np.inf, -np.inf, np.nan]), f"lse: 3 of {N} positions are not finite"),
    "temp_lse NaN": (_set("temp_lse", (4, 0), np.nan), f"temp_lse: 1 of {N} positions are not finite"),
    "label NaN mid-sequence": (
        _set("label_logprob", 10, np.nan),
        f"label_logprob: 1 of {N} {NAN_OR_POSITIVE} (NaN belongs only at a sequence's last position)",
    ),
    "label > 0 at a sequence end": (
        _set("label_logprob", LENGTHS[0] - 1, 0.25),
        f"label_logprob: 1 of {N} {NAN_OR_POSITIVE} (NaN belongs only at a sequence's last position)",
    ),
    "sample counts": (
        _set("sample_counts", (2, 0), 9),
        f"sample_counts: 1 of {N} positions do not add up to the 3 draws per position",
    ),
    "offsets decrease": (
        _set("seq_offsets", 2, 5),
        f"seq_offsets: 1 of {S} sequences end before they start (offsets decrease)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CHEAP_CASES))
def test_each_broken_invariant_is_named_with_its_count(case: str) -> None:
    edit, expected = CHEAP_CASES[case]
    r = good()
    edit(r)
    assert check_records(r, LAYOUT) == [expected]


def test_minus_infinity_and_nan_at_sequence_ends_are_valid() -> None:
    r = good()
    r.topk_logprobs[:, -1] = -np.inf  # probability 0 in the top-k: allowed
    r.log_tail[:5] = -np.inf  # no tail (k = V)
    assert np.isnan(r.label_logprob[LENGTHS[0] - 1])
    assert check_records(r, LAYOUT) == []


def test_offsets_past_the_end() -> None:
    r = good()
    r.seq_offsets[-1] = N + 4
    assert check_records(r, LAYOUT) == [
        f"seq_offsets: run from 0 to {N + 4}, not from 0 to N={N}",
        f"seq_offsets: 1 of {S + 1} offsets lie outside [0, {N}]",
    ]


def test_counts_must_match_the_manifest_entry() -> None:
    entry = dict(name="shards/000000.arrow", index=0, nbytes=1, checksum="sha256:0")
    assert check_records(good(), LAYOUT, ShardInfo(**entry, num_tokens=N, num_sequences=S)) == []
    info = ShardInfo(**entry, num_tokens=N - 1, num_sequences=S)
    assert check_records(good(), LAYOUT, info) == [
        f"counts: holds {N} tokens in {S} sequences, the manifest says {N - 1} in {S}"
    ]


def test_a_layout_the_records_do_not_have() -> None:
    wider = dataclasses.replace(LAYOUT, k=5)
    assert check_records(good(), wider) == [f"topk_ids: expected int32[{N}, 5], got int32[{N}, 4]"]
    assert check_records_deep(good(), wider, ENCODING) == []  # reported once, by the cheap check


# -- the deep checks ---------------------------------------------------------------------------


def _duplicate(r: ShardRecords) -> None:
    t = row_with_label_outside_topk(r)
    r.topk_ids[t, 1] = r.topk_ids[t, 0]  # the label stays outside: only the duplicate is wrong


def _out_of_order(r: ShardRecords) -> None:
    t = row_with_label_outside_topk(r)
    for values in (r.topk_ids, r.topk_logprobs):  # swapped together: only the order is wrong
        values[t, [1, 2]] = values[t, [2, 1]]


def _label_differs(r: ShardRecords) -> None:
    t = row_with_label_outside_topk(r)
    r.input_ids[t + 1] = r.topk_ids[t, 0]  # the label is now the top-1 ...
    r.label_logprob[t] = r.topk_logprobs[t, 0] - 1.0  # ... with another log-prob


def _label_too_high(r: ShardRecords) -> None:
    t = row_with_label_outside_topk(r)
    r.label_logprob[t] = r.topk_logprobs[t, 0]  # outside the top-k, yet as likely as the top-1


def _sample_twice(r: ShardRecords) -> None:
    r.sample_ids[5, 1] = r.sample_ids[5, 0]  # both slots drawn (counts 2 and 1)


DEEP_CASES = {
    "duplicate top-k id": (_duplicate, f"topk_ids: 1 of {N} positions list an id twice"),
    "rank order": (
        _out_of_order,
        f"topk_logprobs: 1 of {N} positions are out of rank order (values must not increase along k)",
    ),
    "label vs its top-k value": (
        _label_differs,
        f"label_logprob: 1 of {N} positions differ from the top-k value of their label (the next "
        "input id) by more than the encoding's error",
    ),
    "label outside the top-k": (
        _label_too_high,
        f"label_logprob: 1 of {N} positions give a label outside the top-k a higher log-prob than the k-th",
    ),
    "tail vs top-k": (
        _set("log_tail", 7, 0.0),
        f"log_tail: 1 of {N} positions disagree with the top-k (1 - the sum of top-k probabilities "
        "differs from exp(log_tail) by more than the encoding's error)",
    ),
    "lse all fill": (
        _set("lse", slice(None), 0.0),
        f"lse: all {N} positions hold 0, the fill value of an array that was never written (a chunk lost or zeroed)",
    ),
    "document_hash all fill": (
        _set("document_hash", slice(None), 0),
        f"document_hash: all {S} sequences hold 0, the fill value",
    ),
    "sample drawn twice": (_sample_twice, f"sample_ids: 1 of {N} positions list a drawn id twice"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DEEP_CASES))
def test_each_deep_problem_is_named_with_its_count(case: str) -> None:
    edit, expected = DEEP_CASES[case]
    r = good()
    edit(r)
    assert check_records(r, LAYOUT) == []  # nothing the trainer's cheap check sees
    assert check_records_deep(r, LAYOUT, ENCODING) == [expected]


def test_all_zero_input_ids_are_fill() -> None:
    r = good()
    r.input_ids[:] = 0
    fill = f"input_ids: all {N} positions hold 0, the fill value of an array that was never written"
    assert any(p.startswith(fill) for p in check_records_deep(r, LAYOUT, ENCODING))


def test_a_small_shard_of_zeros_is_not_called_fill() -> None:
    r = stored(random_records(LAYOUT, [5, 7], seed=0), LAYOUT, ENCODING)
    assert not any("fill" in p for p in check_records_deep(r, LAYOUT, ENCODING))
    r.lse[:] = 0.0
    assert not any("fill" in p for p in check_records_deep(r, LAYOUT, ENCODING))


def _encodings(vocab: int) -> list[TopkEncoding]:
    return [
        TopkEncoding(ids, values)
        for ids in ID_ENCODINGS
        for values in VALUE_ENCODINGS
        if not (ids == "uint16" and vocab > 1 << 16)
    ]


@settings(max_examples=40, deadline=None)
@given(case=layouts_and_lengths(), pick=st.integers(0, 100))
def test_valid_records_pass_every_check_in_every_encoding(case: Any, pick: int) -> None:
    """No false alarms: what a correct producer writes passes, whatever the encoding loses."""
    layout, lengths, seed = case
    encodings = _encodings(layout.vocab_size)
    encoding = encodings[pick % len(encodings)]
    r = stored(random_records(layout, lengths, seed), layout, encoding)
    assert check_records(r, layout) == []
    assert check_records_deep(r, layout, encoding) == []


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_format_1_fixtures_pass_every_check(fmt: str) -> None:
    cache = open_cache(str(OLD / f"cache-1.0-{fmt}"))
    for info in cache.shards:
        r = cache.read_shard(info)
        assert check_records(r, cache.layout, info) == []
        assert check_records_deep(r, cache.layout, cache.encoding) == []
    assert validate_cache(cache.url, deep=True) == []


# -- validate on forged caches, both formats ---------------------------------------------------


def draft(fmt: str) -> Manifest:
    return Manifest(
        format=fmt,
        teacher=TeacherInfo(name_or_path="teacher", weights_sha256="sha256:w"),
        tokenizer=TokenizerInfo(
            name_or_path="tok",
            fingerprint="sha256:t",
            vocab_size=LAYOUT.vocab_size,
            files=(file_info("tokenizer.json", TOKENIZER),),
        ),
        dataset=DatasetInfo(source="d", fingerprint="sha256:d", num_documents=S, num_tokens=3 * N),
        build=BuildSettings(top_k=LAYOUT.k, max_length=32, num_samples=3, temperatures=(2.0,)),
        layout=LAYOUT,
        encoding=ENCODING.to_json(),
    )


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def clean_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three valid shards of N tokens each, with a tokenizer copy."""
    path = tmp_path_factory.mktemp(request.param) / "c"
    writer = CacheWriter(str(path), draft(request.param))
    writer.store_tokenizer({"tokenizer.json": TOKENIZER})
    for i in range(3):
        with writer.shard_writer(i) as w:
            w.write(random_records(LAYOUT, LENGTHS, seed=i))
            writer.commit_shard(w)
    writer.finalize(3)
    return path


@pytest.fixture
def cache(clean_cache: Path, tmp_path: Path) -> Path:
    shutil.copytree(clean_cache, tmp_path / "c")
    return tmp_path / "c"


def name(cache: Path, index: int) -> str:
    return open_cache(str(cache)).shards[index].name


def edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def test_the_clean_cache_validates(cache: Path) -> None:
    assert validate_cache(str(cache), deep=True) == []


@pytest.mark.reliability("tampered-cache")
def test_deep_validate_names_each_content_problem_of_a_forged_shard(cache: Path) -> None:
    def poison(stored: Any) -> None:
        stored.tokens["topk_logprob_top1"][[3, 4]] = np.nan  # q8c: the whole row decodes NaN
        stored.tokens["topk_ids"][7, 1] = 250  # uint16 column, vocabulary of 100
        stored.tokens["lse"][:] = 0.0

    forge_shard(cache, 1, poison)
    shard = name(cache, 1)
    assert validate_cache(str(cache)) == []  # plain: its checksum matches the forged entry
    assert validate_cache(str(cache), deep=True) == [
        Problem(shard, f"topk_ids: 1 of {N} {OUTSIDE}"),
        Problem(shard, f"topk_logprobs: 2 of {N} {NAN_OR_POSITIVE}"),
        Problem(
            shard,
            f"lse: all {N} positions hold 0, the fill value of an array that was never written "
            "(a chunk lost or zeroed)",
        ),
    ]


@pytest.mark.reliability("tampered-cache")
def test_deep_validate_names_a_shard_with_broken_offsets(cache: Path) -> None:
    def break_offsets(stored: Any) -> None:
        stored.seq_offsets[2] = 5  # sequence 1 would end before it starts

    forge_shard(cache, 2, break_offsets, checked=False)
    assert validate_cache(str(cache)) == []
    (problem,) = validate_cache(str(cache), deep=True)
    assert problem.where == name(cache, 2)
    assert "cannot be decoded" in problem.what and "seq_offsets" in problem.what


@pytest.mark.parametrize("clean_cache", ["zarr"], indirect=True)  # Arrow files have no chunks
@pytest.mark.reliability("tampered-cache")
def test_a_zarr_chunk_lost_with_its_checksum_refreshed(cache: Path) -> None:
    chunks = cache / name(cache, 0) / "lse" / "c"
    shutil.rmtree(chunks)
    reseal_shard(cache, 0)
    problems = validate_cache(str(cache), deep=True)
    assert (
        Problem(name(cache, 0), "lse: 0 of 1 chunks stored (the rest read back as zeros)")
        in problems
    )
    assert all(p.where == name(cache, 0) for p in problems)


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("lose a middle entry", "whose indices are not 0..1: missing [1], unexpected [2]"),
        ("lose the last entry", f"its shards hold {2 * N} tokens, its dataset.num_tokens says {3 * N}"),
        ("list one shard twice", "more than once (one shard read twice)"),
        ("edit an index", "whose indices are not 0..2: missing [1], unexpected [5]"),
    ],
)  # fmt: skip
@pytest.mark.reliability("tampered-cache")
def test_shard_list_damage_is_blamed_on_the_manifest(
    cache: Path, damage: str, expected: str
) -> None:
    def edit(m: dict) -> None:
        if damage == "lose a middle entry":
            del m["shards"][1]
        elif damage == "lose the last entry":
            del m["shards"][2]
        elif damage == "list one shard twice":
            m["shards"][2] = {**m["shards"][1], "index": 2}
        else:
            m["shards"][1]["index"] = 5

    edit_manifest(cache, edit)
    problems = validate_cache(str(cache))
    assert any(p.where == "manifest.json" and expected in p.what for p in problems), problems
    if damage.startswith("lose"):  # the shard is still there, just not listed
        assert any(
            p.where == "manifest.json" and "does not list shards/00000" in p.what for p in problems
        )
        assert all(p.where == "manifest.json" for p in problems)


@pytest.mark.reliability("tampered-cache")
def test_an_index_listed_twice_is_refused_naming_the_manifest(cache: Path) -> None:
    edit_manifest(cache, lambda m: m["shards"][2].update(index=1))
    (problem,) = validate_cache(str(cache))
    assert "manifest.json" in problem.what and "listed twice" in problem.what


@pytest.mark.parametrize("key,value", [("k", 3), ("vocab_size", 90)])
@pytest.mark.reliability("tampered-cache")
def test_an_edited_layout_is_blamed_on_the_manifest_not_on_every_shard(
    cache: Path, key: str, value: int
) -> None:
    edit_manifest(cache, lambda m: m["layout"].update({key: value}))
    problems = validate_cache(str(cache), deep=True)
    assert problems and all(p.where == "manifest.json" for p in problems), problems
    assert any(
        f"its layout differs from what all 3 shards say ({key}: {value} here, "
        f"{getattr(LAYOUT, key)} in the shards)" in p.what
        for p in problems
    )


@pytest.mark.reliability("tampered-cache")
def test_one_foreign_shard_is_blamed_on_itself(cache: Path) -> None:
    edit_manifest(cache, lambda m: m["shards"][0].update(origin="sha256:elsewhere"))
    problems = validate_cache(str(cache))
    assert [p.where for p in problems] == [name(cache, 0)]
    assert "does not belong here" in problems[0].what


@pytest.mark.reliability("tampered-cache")
def test_a_truncated_tokenizer_is_caught(cache: Path) -> None:
    (cache / "tokenizer" / "tokenizer.json").write_bytes(TOKENIZER[:-9])
    assert validate_cache(str(cache)) == []  # plain validate reads no tokenizer
    (problem,) = validate_cache(str(cache), deep=True)
    assert (
        problem.where == "tokenizer/"
        and "does not match the manifest's size and checksum" in problem.what
    )
    # ... and with the manifest's checksum forged to match, the file still has to parse.
    edit_manifest(
        cache,
        lambda m: m["tokenizer"].update(
            files=[dataclasses.asdict(file_info("tokenizer.json", TOKENIZER[:-9]))]
        ),
    )
    (problem,) = validate_cache(str(cache), deep=True)
    assert problem.where == "tokenizer/tokenizer.json" and "is not valid JSON" in problem.what


@pytest.mark.reliability("tampered-cache")
def test_a_format_1_tokenizer_without_checksums_must_parse(tmp_path: Path) -> None:
    cache = tmp_path / "old"
    shutil.copytree(OLD / "cache-1.0-zarr", cache)
    tok = cache / "tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:100])
    (problem,) = validate_cache(str(cache), deep=True)
    assert problem.where == "tokenizer/tokenizer.json" and "is not valid JSON" in problem.what
