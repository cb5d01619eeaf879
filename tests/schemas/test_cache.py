"""The manifest contract, the commit protocol, validation, and the CLI's handling of bad caches."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from kdcache.cli import main
from schemas.cache import CacheWriter, open_cache
from schemas.encodings import TopkEncoding, default_encoding
from schemas.errors import CacheCorruptError, CacheNotFoundError, IncompatibleCacheError
from schemas.manifest import (
    BuildSettings,
    DatasetInfo,
    Manifest,
    TeacherInfo,
    TokenizerInfo,
    parse_manifest,
    to_json,
)
from schemas.record import Layout
from schemas.testing import random_records
from schemas.validate import validate_cache


def draft(
    fmt: str = "arrow", k: int = 4, vocab: int = 100, top_k_setting: int | None = None
) -> Manifest:
    return Manifest(
        format=fmt,
        teacher=TeacherInfo(name_or_path="teacher", weights_sha256="sha256:w"),
        tokenizer=TokenizerInfo(name_or_path="tok", fingerprint="sha256:t", vocab_size=vocab),
        dataset=DatasetInfo(
            source="data.jsonl", fingerprint="sha256:d", num_documents=3, num_tokens=36
        ),  # what `make_cache` writes: validation checks the shards add up to it
        build=BuildSettings(top_k=top_k_setting or k, max_length=16),
        layout=Layout(k=k, vocab_size=vocab),
        encoding=default_encoding(vocab).to_json(),
    )


def make_cache(url: str, fmt: str = "arrow", shards: int = 3, finalize: bool = True) -> Manifest:
    writer = CacheWriter(url, draft(fmt))
    for i in range(shards):
        with writer.shard_writer(i) as w:
            w.write(random_records(writer.draft.layout, [5, 7], seed=i))
            writer.commit_shard(w)
    return writer.finalize(shards) if finalize else writer.draft


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_written_cache_opens_and_validates(tmp_path, fmt) -> None:
    m = make_cache(str(tmp_path / "c"), fmt)
    cache = open_cache(str(tmp_path / "c"))
    assert cache.complete and cache.manifest == m and m.num_tokens == 36
    assert validate_cache(str(tmp_path / "c"), deep=True) == []


def test_manifest_round_trips_and_refuses_the_future() -> None:
    m = draft()
    assert parse_manifest(json.loads(to_json(m))) == m
    data = json.loads(to_json(m))
    data["schema_version"] = "4.0"
    with pytest.raises(IncompatibleCacheError, match=r"4\.0.*newer"):
        parse_manifest(data)
    data["schema_version"] = "0.9"
    with pytest.raises(IncompatibleCacheError, match=r"0\.9.*older"):
        parse_manifest(data)
    data["schema_version"] = "3.7"  # a newer minor: readable
    assert parse_manifest(data).layout == m.layout
    data["schema_version"] = "2.0"  # the previous major (compact samples are 3.0)
    assert parse_manifest(data).layout == m.layout
    data["schema_version"] = "1.0"  # an older major this kdcache still reads
    assert parse_manifest(data).layout == m.layout


def test_compact_samples_and_samples_only_need_format_3() -> None:
    """A manifest that claims 2.x but stores compact samples (or no top-k) is refused: a 2.0
    reader would read its draws as every draw."""
    data = json.loads(to_json(draft()))
    data["layout"].update(num_samples=4, compact_samples=True)
    data["schema_version"] = "3.0"
    assert parse_manifest(data).layout.compact_samples
    data["layout"]["k"] = 0
    assert parse_manifest(data).layout.k == 0
    data["schema_version"] = "2.0"
    with pytest.raises(CacheCorruptError, match=r"need schema_version 3\.0"):
        parse_manifest(data)
    data["schema_version"] = "3.0"
    data["layout"]["compact_samples"] = False
    with pytest.raises(CacheCorruptError, match="k = 0"):
        parse_manifest(data)


def test_unknown_fields_need_must_understand_false() -> None:
    data = json.loads(to_json(draft()))
    data["lineage"] = {"parent": "x", "must_understand": False}
    assert parse_manifest(data).extensions == {"lineage": {"parent": "x", "must_understand": False}}
    data["quantiser"] = {"bits": 3}
    with pytest.raises(CacheCorruptError, match="quantiser"):
        parse_manifest(data)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("layout", {"k": "four", "vocab_size": 10}, "Layout.k"),
        ("format", "hdf5", "format"),
        (
            "shards",
            [
                {
                    "name": "../../etc/passwd",
                    "index": 0,
                    "num_tokens": 1,
                    "num_sequences": 1,
                    "nbytes": 1,
                    "checksum": "x",
                }
            ],
            "not inside",
        ),
        (
            "shards",
            [
                {
                    "name": "/abs/shard.arrow",
                    "index": 0,
                    "num_tokens": 1,
                    "num_sequences": 1,
                    "nbytes": 1,
                    "checksum": "x",
                }
            ],
            "not inside",
        ),
    ],
)
def test_malformed_manifests_are_named(field, value, match) -> None:
    data = json.loads(to_json(draft()))
    data[field] = value
    with pytest.raises(CacheCorruptError, match=match):
        parse_manifest(data)


def test_rerun_with_other_settings_is_refused_and_names_the_difference(tmp_path) -> None:
    make_cache(str(tmp_path / "c"))
    with pytest.raises(IncompatibleCacheError, match="top_k"):
        CacheWriter(str(tmp_path / "c"), draft(top_k_setting=9))
    fresh = CacheWriter(str(tmp_path / "c"), draft(top_k_setting=9), overwrite=True)
    assert fresh.committed() == {} and not fresh.complete


def test_interrupted_build_keeps_committed_shards_only(tmp_path) -> None:
    url = str(tmp_path / "c")
    writer = CacheWriter(url, draft())
    with writer.shard_writer(0) as w:
        w.write(random_records(writer.draft.layout, [4], 0))
        writer.commit_shard(w)
    half = writer.shard_writer(1)
    half.write(random_records(writer.draft.layout, [4], 1))  # never finalized: a crash
    cache = open_cache(url)
    assert [s.index for s in cache.shards] == [0] and not cache.complete
    again = CacheWriter(url, draft())
    assert set(again.committed()) == {0}
    again.remove_temporaries()
    assert [p.name for p in (tmp_path / "c" / "shards").iterdir()] == ["000000.arrow"]
    with pytest.raises(IncompatibleCacheError, match="still being built"):
        open_cache(url, require_complete=True)


def test_missing_cache_is_a_file_not_found(tmp_path) -> None:
    with pytest.raises(CacheNotFoundError) as err:
        open_cache(str(tmp_path / "nope"))
    assert isinstance(err.value, FileNotFoundError)


def _corrupt(tmp_path, how: str) -> tuple[str, str]:
    url = str(tmp_path / "c")
    make_cache(url, "arrow")
    target = tmp_path / "c" / "shards" / "000001.arrow"
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif how == "delete":
        target.unlink()
    elif how == "escape":
        m = json.loads((tmp_path / "c" / "manifest.json").read_text())
        m["shards"][1]["name"] = "shards/../../outside.arrow"
        (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    elif how == "future":
        m = json.loads((tmp_path / "c" / "manifest.json").read_text())
        m["schema_version"] = "9.0"
        (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    elif how == "garbage-manifest":
        (tmp_path / "c" / "manifest.json").write_text("{not json")
    return url, "000001.arrow"


@pytest.mark.parametrize(
    "how,needle",
    [
        ("flip", "000001.arrow"),
        ("truncate", "000001.arrow"),
        ("delete", "000001.arrow"),
        ("escape", "outside"),
        ("future", "9.0"),
        ("garbage-manifest", "not valid JSON"),
    ],
)
def test_validate_cli_catches_each_corruption_in_one_line(tmp_path, how, needle) -> None:
    url, _ = _corrupt(tmp_path, how)
    result = CliRunner().invoke(main, ["validate", url])
    assert result.exit_code != 0
    assert needle in result.output
    assert "Traceback" not in result.output
    inspect = CliRunner().invoke(main, ["inspect", url])
    if how in ("escape", "future", "garbage-manifest"):
        assert inspect.exit_code != 0 and "Traceback" not in inspect.output
        assert len(inspect.output.strip().splitlines()) == 1


def test_validate_and_inspect_on_a_good_cache(tmp_path) -> None:
    make_cache(str(tmp_path / "c"), "zarr")
    ok = CliRunner().invoke(main, ["validate", str(tmp_path / "c"), "--deep"])
    assert ok.exit_code == 0, ok.output
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "c"), "--json"])
    info = json.loads(out.output)
    assert info["k"] == 4 and info["tokens"] == 36 and info["bytes_per_token"] > 0
    fid = info["fidelity"]  # measured by the shard writers, shown from the manifest alone
    assert fid["positions"] == 36 and 0 < fid["mean_tail_mass"] < 1
    assert fid["encoding_max_abs_logprob_error"] > 0 and info["teacher_stats"] is None
    text = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")])
    assert "bytes/token" in text.output and "tail mass" in text.output


def test_deep_validate_finds_bad_records(tmp_path) -> None:
    """Records that break an invariant (here: log-probs out of rank order) fail --deep."""
    url = str(tmp_path / "c")
    lossless = dataclasses.replace(
        draft(),
        encoding=TopkEncoding(ids="uint32", values="float32").to_json(),
        dataset=dataclasses.replace(draft().dataset, num_tokens=6),
    )
    writer = CacheWriter(url, lossless)
    records = random_records(writer.draft.layout, [6], 0)
    records.topk_logprobs[:, [0, 1]] = records.topk_logprobs[:, [1, 0]]
    with writer.shard_writer(0) as w:
        w.write(records)
        writer.commit_shard(w)
    writer.finalize(1)
    problems = validate_cache(url, deep=True)
    assert any("rank order" in p.what and p.where == "shards/000000.arrow" for p in problems)
    assert validate_cache(url, deep=False) == []


def test_half_written_commit_records_of_other_ranks_are_ignored(tmp_path) -> None:
    url = str(tmp_path / "c")
    make_cache(url, shards=2, finalize=False)
    (tmp_path / "c" / "commits" / ".tmp-abcd-000005.json").write_text('{"name": "shards/0000')
    assert set(CacheWriter(url, draft()).committed()) == {0, 1}


def _killed_between_record_and_move(url: str, monkeypatch) -> tuple[CacheWriter, str]:
    """Commit shard 1 of a 2-shard cache, but die before its move into shards/."""
    import schemas.writer

    small = dataclasses.replace(draft(), dataset=dataclasses.replace(draft().dataset, num_tokens=9))
    writer = CacheWriter(url, small)
    with writer.shard_writer(0) as w:
        w.write(random_records(writer.draft.layout, [4], 0))
        writer.commit_shard(w)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt("killed mid-move")

    monkeypatch.setattr(schemas.writer, "publish_shard", killed)
    shard = writer.shard_writer(1)
    shard.write(random_records(writer.draft.layout, [5], 1))
    with pytest.raises(KeyboardInterrupt):
        writer.commit_shard(shard)
    monkeypatch.undo()
    return CacheWriter(url, small), shard.tmp_path


def test_shards_folder_holds_committed_shards_only_and_a_rerun_finishes_the_move(
    tmp_path, monkeypatch
) -> None:
    url = str(tmp_path / "c")
    again, _ = _killed_between_record_and_move(url, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == ["000000.arrow"]
    assert set(again.committed()) == {0, 1}
    again.recover()
    again.remove_temporaries()
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == [
        "000000.arrow",
        "000001.arrow",
    ]
    assert list((tmp_path / "c" / "staging").iterdir()) == []
    again.finalize(2)
    assert validate_cache(url, deep=True) == []


def test_recover_keeps_a_finished_move_and_redoes_a_lost_shard(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    url = str(tmp_path / "c")
    again, staged = _killed_between_record_and_move(url, monkeypatch)
    final = tmp_path / "c" / "shards" / "000001.arrow"
    # The move had copied the shard and was deleting the staged copy when it was killed.
    final.write_bytes(Path(staged).read_bytes())
    Path(staged).write_bytes(b"half deleted")
    again.recover()
    assert not Path(staged).exists() and final.exists() and set(again.committed()) == {0, 1}
    # Neither copy whole: the record goes, so the rerun writes the shard again.
    again, staged = _killed_between_record_and_move(str(tmp_path / "d"), monkeypatch)
    Path(staged).write_bytes(b"damaged")
    again.recover()
    assert set(again.committed()) == {0}
