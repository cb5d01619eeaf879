"""Merge, split and subset (`schemas.derive`) on caches written with the library writer.

Each source cache is laid out by hand: per shard, a list of windows (document, start, length),
so the tests know which document every sequence belongs to and what each operation must keep.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest

import schemas._derive_write
import schemas._transfer
from schemas import (
    CacheCorruptError,
    ConfigError,
    IncompatibleCacheError,
    merge_caches,
    open_cache,
    split_cache,
    subset_cache,
)
from schemas._transfer import transfer
from schemas.cache import CacheWriter, file_info
from schemas.derive import val_documents
from schemas.encodings import TopkEncoding
from schemas.manifest import Manifest
from schemas.record import Layout, document_hash
from schemas.testing import random_records
from schemas.validate import validate_cache
from tests.schemas.test_cache import draft

LAYOUT = Layout(k=4, vocab_size=100, content_keys=True)
TOKENIZER = {"tokenizer.json": b'{"vocab": {}}', "tokenizer_config.json": b"{}"}
FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"

Window = tuple[int, int, int]
"""(document, start, length): tokens start..start+length of a document."""

A = [[(0, 0, 5), (1, 0, 7)], [(2, 0, 6), (3, 0, 8)], [(3, 8, 4), (4, 0, 5)]]
B = [[(3, 0, 8), (5, 0, 6)], [(6, 0, 5), (7, 0, 9)], [(1, 0, 7), (8, 0, 4)]]
"""B holds documents 1 and 3 of A (each in a shard with a document of its own)."""


def key(doc: int) -> int:
    return document_hash(np.array([doc]))


def write_source(
    url: str,
    shards: list[list[Window]],
    fmt: str = "arrow",
    seed: int = 0,
    storage_options: dict | None = None,
    **changes,
) -> Manifest:
    """A complete cache whose shard i holds the windows `shards[i]`, with a tokenizer copy."""
    base = draft(fmt)
    base = dataclasses.replace(
        base,
        layout=LAYOUT,
        dataset=dataclasses.replace(
            base.dataset,
            fingerprint=f"sha256:data-{seed}",
            num_tokens=sum(n for shard in shards for *_, n in shard),
            num_documents=sum(s == 0 for shard in shards for _, s, _ in shard),
        ),
        tokenizer=dataclasses.replace(
            base.tokenizer, files=tuple(file_info(n, d) for n, d in sorted(TOKENIZER.items()))
        ),
    )
    if "tokenizer" in changes:  # another tokenizer, with the same copy in the cache
        changes["tokenizer"] = dataclasses.replace(changes["tokenizer"], files=base.tokenizer.files)
    writer = CacheWriter(url, dataclasses.replace(base, **changes), **(storage_options or {}))
    writer.store_tokenizer(TOKENIZER)
    for i, windows in enumerate(shards):
        records = random_records(writer.draft.layout, [n for *_, n in windows], seed=seed * 97 + i)
        records = dataclasses.replace(
            records,
            document_hash=np.array([key(d) for d, *_ in windows], dtype=np.uint64),
            source_start=np.array([s for _, s, _ in windows], dtype=np.int64),
        )
        with writer.shard_writer(i) as w:
            w.write(records)
            writer.commit_shard(w)
    return writer.finalize(len(shards))


def windows(url: str, **storage_options) -> list[tuple[int, int, bytes]]:
    """Every sequence of a cache in order: (content key, start, its stored input ids)."""
    cache = open_cache(url, **storage_options)
    out = []
    for i in range(len(cache.shards)):
        r = cache.read_shard(i)
        for s in range(r.num_sequences):
            ids = r.input_ids[r.seq_offsets[s] : r.seq_offsets[s + 1]]
            out.append((int(r.document_hash[s]), int(r.source_start[s]), ids.tobytes()))
    return out


def shard_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture(params=["arrow", "zarr"])
def fmt(request) -> str:
    return request.param


@pytest.fixture
def ab(tmp_path: Path, fmt: str) -> tuple[str, str]:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_source(a, A, fmt, seed=1)
    write_source(b, B, fmt, seed=2)
    return a, b


# -- merge -------------------------------------------------------------------------------------


def test_merge_keeps_each_document_once_from_the_first_cache(ab, tmp_path: Path) -> None:
    a, b = ab
    out = str(tmp_path / "m")
    result = merge_caches([a, b], out)
    in_a = {k for k, _, _ in windows(a)}
    assert windows(out) == windows(a) + [w for w in windows(b) if w[0] not in in_a]
    assert result.outputs[0].moved == {"linked": 4, "copied": 0, "rewritten": 2, "already there": 0}
    assert result.dropped == (2, 2, 15)  # documents 1 and 3 of B: 7 + 8 tokens
    assert validate_cache(out, deep=True) == []
    m = open_cache(out).manifest
    assert m.num_tokens == m.dataset.num_tokens == 35 + 24
    assert m.dataset.num_documents == 9  # windows that start a document: 0-4 of A, 5-8 of B
    assert m.derived is not None and m.derived.operation == "merge"
    assert [s.fingerprint for s in m.derived.sources] == [
        open_cache(a).manifest.fingerprint,
        open_cache(b).manifest.fingerprint,
    ]
    assert [s.url for s in m.derived.sources] == ["a", "b"]  # local paths: their last part
    assert m.dataset.fingerprint not in (open_cache(a).manifest.dataset.fingerprint,)
    assert "merged into" in result.summary() and "2 duplicate documents" in result.summary()
    with open_cache(out).tokenizer_files() as folder:
        assert {n: Path(folder, n).read_bytes() for n in TOKENIZER} == TOKENIZER


def test_taken_over_shards_are_hard_links_with_the_same_records(ab, tmp_path: Path) -> None:
    a, b = ab
    out = tmp_path / "m"
    merge_caches([a, b], str(out))
    merged, src_a, src_b = open_cache(str(out)), open_cache(a), open_cache(b)
    linked = [s for s in merged.shards if s.origin is not None]
    assert [(s.origin, s.origin_index) for s in linked] == [
        (src_a.manifest.fingerprint, 0),
        (src_a.manifest.fingerprint, 1),
        (src_a.manifest.fingerprint, 2),
        (src_b.manifest.fingerprint, 1),
    ]
    for info in linked:
        source = src_a if info.origin == src_a.manifest.fingerprint else src_b
        original = source.shards[info.origin_index]
        ours, theirs = shard_files(out / info.name), shard_files(Path(source.root) / original.name)
        assert [p.stat().st_ino for p in ours] == [p.stat().st_ino for p in theirs]
        assert merged.read_shard(info).equals(source.read_shard(original))
        assert info.fidelity == original.fidelity and info.checksum == original.checksum


def test_without_hard_links_shards_are_copied(ab, tmp_path: Path, monkeypatch) -> None:
    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    # Only the hard links of taken-over shards fail (zarr links files of its own when writing).
    monkeypatch.setattr(
        schemas._transfer, "os", SimpleNamespace(**{**vars(os), "link": cross_device})
    )
    a, b = ab
    out = tmp_path / "m"
    result = merge_caches([a, b], str(out))
    assert result.outputs[0].moved == {"linked": 0, "copied": 4, "rewritten": 2, "already there": 0}
    source = Path(a) / open_cache(a).shards[0].name
    assert shard_files(out / open_cache(str(out)).shards[0].name)[0].stat().st_ino != (
        shard_files(source)[0].stat().st_ino
    )
    assert validate_cache(str(out), deep=True) == []


def test_a_shard_that_is_a_symbolic_link_is_refused(ab, tmp_path: Path) -> None:
    a, b = ab
    shard = Path(a) / open_cache(a).shards[0].name
    elsewhere = tmp_path / "elsewhere"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)
    with pytest.raises(CacheCorruptError, match="symbolic link"):
        merge_caches([a, b], str(tmp_path / "m"))
    # The same guard where the shard is linked, for a link put there after it was read.
    local = fsspec.filesystem("file")
    with pytest.raises(CacheCorruptError, match="symbolic link"):
        transfer(local, str(shard), local, str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()


def test_rewritten_shards_hold_the_kept_sequences_bit_for_bit(ab, tmp_path: Path) -> None:
    a, b = ab
    out = str(tmp_path / "m")
    merge_caches([a, b], out)
    merged, src_b = open_cache(out), open_cache(b)
    rewritten = [s for s in merged.shards if s.origin is None]
    assert [s.index for s in rewritten] == [3, 5]
    for info, (source_index, kept) in zip(rewritten, [(0, [1]), (2, [1])], strict=True):
        ours = merged.reader(info).read_stored()
        theirs = src_b.reader(source_index).read_stored().select(kept)
        for name in theirs.tokens:
            assert ours.tokens[name].tobytes() == theirs.tokens[name].tobytes(), name
        for name in theirs.sequences:
            assert ours.sequences[name].tobytes() == theirs.sequences[name].tobytes(), name
        assert ours.seq_offsets.tolist() == theirs.seq_offsets.tolist()


def test_rewritten_fidelity_is_exact_where_stored_and_scaled_elsewhere(ab, tmp_path) -> None:
    a, b = ab
    out = str(tmp_path / "m")
    merge_caches([a, b], out)
    merged, src_b = open_cache(out), open_cache(b)
    info, source = merged.shards[3], src_b.shards[0]
    f, g = info.fidelity, source.fidelity
    assert f is not None and g is not None
    records = merged.read_shard(info)
    assert f.positions == info.num_tokens == 6 and f.label_positions == 5
    assert f.tail_mass_sum == pytest.approx(np.exp(records.log_tail.astype(np.float64)).sum())
    assert f.topk_entropy_sum == pytest.approx(g.topk_entropy_sum * 6 / g.positions)
    fidelity = merged.manifest.fidelity
    assert fidelity is not None and fidelity.positions == merged.manifest.num_tokens
    tails = np.concatenate([np.exp(r.log_tail.astype(np.float64)) for r in merged])
    assert fidelity.mean_tail_mass == pytest.approx(tails.mean(), rel=1e-9)


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"layout": dataclasses.replace(LAYOUT, k=8)}, "layout.k: 4 -> 8"),
        ({"format": "zarr"}, "format: 'arrow' -> 'zarr'"),
        ("tokenizer", "tokenizer.fingerprint: 'sha256:t' -> 'sha256:other'"),
        ("teacher", "teacher.weights_sha256: 'sha256:w' -> 'sha256:other'"),
        ("build", "build.max_length: 16 -> 32"),
        (
            {"encoding": TopkEncoding(ids="uint32", values="float32").to_json()},
            "encoding.ids: 'uint16' -> 'uint32'",
        ),
    ],
)
def test_merge_refuses_caches_that_differ_naming_the_field(tmp_path, changes, named) -> None:
    base = draft()
    edits = {
        "tokenizer": {"tokenizer": dataclasses.replace(base.tokenizer, fingerprint="sha256:other")},
        "teacher": {"teacher": dataclasses.replace(base.teacher, weights_sha256="sha256:other")},
        "build": {"build": dataclasses.replace(base.build, max_length=32)},
    }
    write_source(str(tmp_path / "a"), A, seed=1)
    write_source(
        str(tmp_path / "b"), B, seed=2, **(edits[changes] if isinstance(changes, str) else changes)
    )
    with pytest.raises(IncompatibleCacheError) as err:
        merge_caches([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m").exists()


def test_merge_accepts_what_does_not_change_meaning(tmp_path: Path) -> None:
    base = draft()
    write_source(str(tmp_path / "a"), A, seed=1)
    write_source(
        str(tmp_path / "b"),
        B,
        seed=2,
        teacher=dataclasses.replace(base.teacher, name_or_path="elsewhere/teacher"),
        build=dataclasses.replace(base.build, seed=5, shard_tokens=99, config={"x": 1}),
    )
    merge_caches([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert validate_cache(str(tmp_path / "m"), deep=True) == []


@pytest.mark.parametrize("old", ["cache-1.0-arrow", "cache-1.0-zarr"])
def test_format_1_caches_are_refused_with_a_rebuild_hint(tmp_path: Path, old: str) -> None:
    source = str(FIXTURES / old)
    for run in (
        lambda: merge_caches([source, source], str(tmp_path / "m")),
        lambda: split_cache(source, val_fraction=0.5, out_train="t", out_val="v"),
        lambda: subset_cache(source, max_tokens=100, out=str(tmp_path / "s")),
    ):
        with pytest.raises(IncompatibleCacheError, match=r"format 1\.0 .*content keys.*rebuild"):
            run()


def test_unfinished_and_keyless_caches_are_refused(tmp_path: Path) -> None:
    a = str(tmp_path / "a")
    write_source(a, A, seed=1)
    keyless = str(tmp_path / "keyless")
    writer = CacheWriter(keyless, draft())
    with writer.shard_writer(0) as w:
        w.write(random_records(writer.draft.layout, [4], seed=0))
        writer.commit_shard(w)
    with pytest.raises(IncompatibleCacheError, match="still being built"):
        merge_caches([a, keyless], str(tmp_path / "m"))
    writer.finalize(1)
    with pytest.raises(IncompatibleCacheError, match="without content keys"):
        merge_caches([a, keyless], str(tmp_path / "m"))


def test_a_killed_merge_resumes_to_the_same_cache(ab, tmp_path: Path, monkeypatch) -> None:
    a, b = ab
    merge_caches([a, b], str(tmp_path / "whole"))
    out = str(tmp_path / "m")
    calls = []

    def dies_on_the_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return take_over(*args)

    take_over = schemas._derive_write.take_over
    monkeypatch.setattr(schemas._derive_write, "take_over", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        merge_caches([a, b], out)
    monkeypatch.undo()
    assert open_cache(out).manifest.status == "building"
    resumed = merge_caches([a, b], out)
    assert resumed.outputs[0].moved == {
        "linked": 1,
        "copied": 0,
        "rewritten": 1,
        "already there": 4,
    }
    first, second = open_cache(str(tmp_path / "whole")).manifest, open_cache(out).manifest
    assert second.fingerprint == first.fingerprint and second.shards == first.shards
    assert validate_cache(out, deep=True) == []
    assert not os.listdir(tmp_path / "m" / "staging")
    assert merge_caches([a, b], out).outputs[0].already_complete


def test_an_occupied_output_is_refused_unless_overwrite(ab, tmp_path: Path) -> None:
    a, b = ab
    out = tmp_path / "m"
    merge_caches([a, b], str(out))
    with pytest.raises(IncompatibleCacheError, match="other settings"):
        merge_caches([b, a], str(out))  # another order: another token stream
    merge_caches([b, a], str(out), overwrite=True)
    assert windows(str(out))[0] == windows(b)[0]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(IncompatibleCacheError, match="not empty"):
        merge_caches([a, b], str(other))
    with pytest.raises(ConfigError, match="is also"):
        merge_caches([a, b], a, overwrite=True)
    assert validate_cache(a, deep=True) == []


def test_a_derived_cache_derives_again(ab, tmp_path: Path) -> None:
    a, b = ab
    merge_caches([a, b], str(tmp_path / "m"))
    subset_cache(str(tmp_path / "m"), max_tokens=10**6, out=str(tmp_path / "s"))
    first = open_cache(str(tmp_path / "s")).shards[0]
    assert first.origin == open_cache(a).manifest.fingerprint and first.origin_index == 0
    assert validate_cache(str(tmp_path / "s"), deep=True) == []
    assert windows(str(tmp_path / "s")) == windows(str(tmp_path / "m"))


def test_merge_on_memory_and_from_disk_to_memory_copies(tmp_path, fmt, monkeypatch) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    a, b = f"memory://derive-{fmt}/a", f"memory://derive-{fmt}/b"
    write_source(a, A, fmt, seed=1)
    write_source(b, B, fmt, seed=2)
    copied_from = []  # what the store copied on its own side
    cp_file = MemoryFileSystem.cp_file

    def spy(self, path1, path2, **kwargs):
        copied_from.append(path1)
        return cp_file(self, path1, path2, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cp_file", spy)
    result = merge_caches([a, b], f"memory://derive-{fmt}/m")
    assert result.outputs[0].moved["copied"] == 4 and result.outputs[0].moved["linked"] == 0
    sources = {p.split("/shards/")[0] for p in copied_from if "/shards/" in p}
    assert sources == {f"/derive-{fmt}/a", f"/derive-{fmt}/b"}
    assert validate_cache(f"memory://derive-{fmt}/m", deep=True) == []
    write_source(str(tmp_path / "a"), A, fmt, seed=1)
    write_source(str(tmp_path / "b"), B, fmt, seed=2)
    streamed = merge_caches([str(tmp_path / "a"), str(tmp_path / "b")], f"memory://derive-{fmt}/d")
    assert streamed.outputs[0].moved["copied"] == 4
    assert validate_cache(f"memory://derive-{fmt}/d", deep=True) == []
    assert windows(f"memory://derive-{fmt}/d") == windows(f"memory://derive-{fmt}/m")


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["arrow"])  # zarr's many small objects are slow on moto
def test_merge_on_s3_copies_on_the_server(s3_options, fmt: str) -> None:
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdirs("kdcache-derive", exist_ok=True)
    a, b, out = (f"s3://kdcache-derive/{fmt}/{n}" for n in ("a", "b", "m"))
    write_source(a, A, fmt, seed=1, storage_options=s3_options)
    write_source(b, B, fmt, seed=2, storage_options=s3_options)
    result = merge_caches([a, b], out, **s3_options)
    assert result.outputs[0].moved == {"linked": 0, "copied": 4, "rewritten": 2, "already there": 0}
    assert validate_cache(out, deep=True, **s3_options) == []
    in_a = {k for k, _, _ in windows(a, **s3_options)}
    expected = windows(a, **s3_options) + [w for w in windows(b, **s3_options) if w[0] not in in_a]
    assert windows(out, **s3_options) == expected


# -- split -------------------------------------------------------------------------------------


def many_documents(seed: int, documents: int = 30, per_shard: int = 10) -> list[list[Window]]:
    """Documents of one to three windows each, in order, cut into shards (a document's windows
    often straddle two shards)."""
    rng = np.random.default_rng(seed)
    flat: list[Window] = []
    for doc in range(documents):
        start = 0
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(3, 12))
            flat.append((doc, start, n))
            start += n
    return [flat[i : i + per_shard] for i in range(0, len(flat), per_shard)]


def tokens_of(ws: list[tuple[int, int, bytes]]) -> int:
    return sum(len(ids) // 4 for _, _, ids in ws)  # int32 input ids


def test_split_is_by_whole_documents_and_partitions_the_cache(tmp_path, fmt) -> None:
    src, fraction = str(tmp_path / "src"), 0.25
    write_source(src, many_documents(0), fmt)
    every = windows(src)
    total = tokens_of(every)
    largest = max(
        sum(len(ids) // 4 for k, _, ids in every if k == doc) for doc in {k for k, _, _ in every}
    )
    val_keys = {}
    for seed in (0, 1):
        train, val = str(tmp_path / f"train{seed}"), str(tmp_path / f"val{seed}")
        result = split_cache(src, val_fraction=fraction, out_train=train, out_val=val, seed=seed)
        t, v = windows(train), windows(val)
        assert sorted(t + v) == sorted(every)  # every sequence on exactly one side
        assert not {k for k, _, _ in t} & {k for k, _, _ in v}  # no document on both
        assert fraction * total <= tokens_of(v) < fraction * total + largest
        for url in (train, val):
            assert validate_cache(url, deep=True) == []
            assert open_cache(url).manifest.dataset.num_tokens == tokens_of(windows(url))
        for out in result.outputs:
            assert sum(out.moved.values()) == out.shards
        val_keys[seed] = {k for k, _, _ in v}
        assert "val holds" in result.summary()
    assert val_keys[0] != val_keys[1]
    again = split_cache(src, val_fraction=fraction, out_train=str(tmp_path / "t"),
                        out_val=str(tmp_path / "v"), seed=0)  # fmt: skip
    assert windows(str(tmp_path / "v")) == windows(str(tmp_path / "val0"))
    assert again.outputs[1].tokens == tokens_of(windows(str(tmp_path / "val0")))


def test_val_documents_do_not_depend_on_shard_order() -> None:
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**64, 500, dtype=np.uint64).repeat(rng.integers(1, 4, 500))
    lengths = rng.integers(1, 100, keys.size)
    picked = val_documents(keys, lengths, 0.2, seed=7)
    order = rng.permutation(keys.size)
    assert picked.tolist() == val_documents(keys[order], lengths[order], 0.2, seed=7).tolist()
    assert picked.tolist() != val_documents(keys, lengths, 0.2, seed=8).tolist()
    share = lengths[np.isin(keys, picked)].sum() / lengths.sum()
    assert 0.2 <= share < 0.25


def test_split_refuses_bad_fractions_and_empty_sides(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    write_source(src, [[(0, 0, 5)], [(0, 5, 5)]])  # one document in two windows
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="--val-fraction"):
            split_cache(src, val_fraction=bad, out_train="t", out_val="v")
    with pytest.raises(ConfigError, match=r"train part .* empty"):
        split_cache(src, val_fraction=0.1, out_train=str(tmp_path / "t"),
                    out_val=str(tmp_path / "v"))  # fmt: skip
    with pytest.raises(ConfigError, match="is also"):
        split_cache(src, val_fraction=0.1, out_train=str(tmp_path / "t"),
                    out_val=str(tmp_path / "t"))  # fmt: skip


# -- subset ------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [5, 12, 13, 29, 63, 64, 10**6])
def test_subset_keeps_the_longest_prefix_of_whole_sequences(tmp_path, fmt, budget) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "sub")
    write_source(src, A, fmt)  # sequences of 5, 7 | 6, 8 | 4, 5 tokens: 64 in all
    result = subset_cache(src, max_tokens=budget, out=out)
    every, kept = windows(src), windows(out)
    assert kept == every[: len(kept)]
    assert tokens_of(kept) <= budget
    assert len(kept) == len(every) or tokens_of(every[: len(kept) + 1]) > budget
    moved = result.outputs[0].moved
    assert moved["rewritten"] <= 1 and moved["linked"] == sum(
        tokens_of(every[:i]) <= budget for i in (2, 4, 6)
    )
    assert validate_cache(out, deep=True) == []
    assert open_cache(out).manifest.derived.options == {"max_tokens": budget}


def test_subset_refuses_a_budget_below_the_first_sequence(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    write_source(src, A)
    with pytest.raises(ConfigError, match="first sequence holds 5 tokens"):
        subset_cache(src, max_tokens=4, out=str(tmp_path / "sub"))
