"""`kdcache merge`, `split` and `subset` as a user runs them: the installed command in a fresh
process, on caches the real builder made with the tiny teacher over overlapping documents."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from schemas import open_cache
from schemas.record import document_hash
from tests.fixtures.cli import kdcache, one_line_error

pytestmark = pytest.mark.integration

SMALL = ["--max-length", "64", "--shard-tokens", "512", "--batch-tokens", "256", "--no-progress"]
OLD = Path(__file__).parents[1] / "fixtures" / "data" / "cache-1.0-arrow"


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """24 pre-tokenized documents, some longer than one window."""
    rng = np.random.default_rng(11)
    return [rng.integers(1, 384, int(n)).tolist() for n in rng.integers(20, 150, 24)]


def build(teacher: Path, docs: list[list[int]], out: Path, *extra: str) -> Path:
    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    kdcache("build", "--teacher", teacher, "--dataset", data, "--out", out, *SMALL, *extra)
    return out


@pytest.fixture(scope="module")
def caches(tiny_llama_dir: Path, documents, tmp_path_factory) -> dict[str, Path]:
    """Per format, cache "a" over documents 0-15 and "b" over 8-23 (8 documents in both)."""
    root = tmp_path_factory.mktemp("derive")
    out = {}
    for fmt in ("arrow", "zarr"):
        for name, docs in (("a", documents[:16]), ("b", documents[8:])):
            out[f"{fmt}-{name}"] = build(
                tiny_llama_dir, docs, root / f"{fmt}-{name}", "--top-k", "8", "--format", fmt
            )
    return out


def sequences(url: Path | str) -> list[tuple[int, int, bytes]]:
    """(content key, window start, input ids) of every sequence, in cache order."""
    cache = open_cache(str(url))
    out = []
    for info in cache.shards:
        r = cache.read_shard(info)
        for s in range(r.num_sequences):
            ids = r.input_ids[r.seq_offsets[s] : r.seq_offsets[s + 1]]
            out.append((int(r.document_hash[s]), int(r.source_start[s]), ids.tobytes()))
    return out


def files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_merge_keeps_every_document_once_validates_and_links(
    caches, documents, tmp_path: Path, fmt: str
) -> None:
    a, b, out = caches[f"{fmt}-a"], caches[f"{fmt}-b"], tmp_path / "merged"
    proc = kdcache("merge", a, b, "--out", out)
    line = proc.stdout.strip()
    assert "\n" not in line and "merged into" in line and "dropped 8 duplicate documents" in line

    merged = sequences(out)
    windows = Counter((key, start) for key, start, _ in merged)
    assert max(windows.values()) == 1  # no window twice
    assert {key for key, _ in windows} == {document_hash(np.array(d)) for d in documents}
    in_a = {key for key, _, _ in sequences(a)}
    assert merged == sequences(a) + [s for s in sequences(b) if s[0] not in in_a]
    assert "ok:" in kdcache("validate", out, "--deep").stdout

    cache = open_cache(str(out))
    sources = {c.manifest.fingerprint: c for c in (open_cache(str(a)), open_cache(str(b)))}
    linked = [s for s in cache.shards if s.origin is not None]
    assert len(linked) >= len(sources[cache.manifest.derived.sources[0].fingerprint].shards)
    for info in linked:  # same files (hard links), same records
        source = sources[info.origin]
        original = source.shards[info.origin_index]
        inodes = [p.stat().st_ino for p in files(out / info.name)]
        assert inodes == [p.stat().st_ino for p in files(Path(source.root) / original.name)]
        assert cache.read_shard(info).equals(source.read_shard(original))
    assert f"{len(linked)} linked" in line


def test_a_merged_cache_trains(caches, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    kdcache("merge", caches["arrow-a"], caches["arrow-b"], "--out", out)
    trained = kdcache("train", "--cache", out, "--out", tmp_path / "run", "--max-steps", "2",
                      "--batch-tokens", "256", "--no-progress")  # fmt: skip
    assert "trained 2 steps" in trained.stdout
    assert np.isfinite(json.loads((tmp_path / "run" / "result.json").read_text())["final_loss"])


def test_merge_refusals_name_what_differs(
    tiny_llama_dir: Path, documents, caches, tmp_path: Path
) -> None:
    k4 = build(tiny_llama_dir, documents[:4], tmp_path / "k4", "--top-k", "4", "--format", "arrow")
    out = tmp_path / "merged"
    line = one_line_error(kdcache("merge", caches["arrow-a"], k4, "--out", out, check=False))
    assert "layout.k: 8 -> 4" in line and "build.top_k: 8 -> 4" in line
    line = one_line_error(
        kdcache("merge", caches["arrow-a"], caches["zarr-b"], "--out", out, check=False)
    )
    assert "format: 'arrow' -> 'zarr'" in line
    line = one_line_error(kdcache("merge", caches["arrow-a"], OLD, "--out", out, check=False))
    assert "format 1.0" in line and "rebuild" in line
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_line_error(
        kdcache("merge", caches["arrow-a"], caches["arrow-b"], "--out", out, check=False)
    )
    assert "not empty" in line and "--overwrite" in line


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_split_by_whole_documents_deterministic_per_seed(caches, tmp_path: Path, fmt) -> None:
    source = caches[f"{fmt}-a"]
    every = sequences(source)
    total = sum(len(ids) for *_, ids in every) // 4
    val_keys = []
    for run, seed in enumerate(("0", "0", "1")):
        train, val = tmp_path / f"train{run}", tmp_path / f"val{run}"
        line = kdcache("split", source, "--val-fraction", "0.25", "--out-train", train,
                       "--out-val", val, "--seed", seed).stdout.strip()  # fmt: skip
        assert "\n" not in line and "val holds" in line
        t, v = sequences(train), sequences(val)
        assert sorted(t + v) == sorted(every)
        assert not {k for k, _, _ in t} & {k for k, _, _ in v}
        assert sum(len(ids) for *_, ids in v) // 4 >= 0.25 * total
        val_keys.append({k for k, _, _ in v})
        for url in (train, val):
            assert "ok:" in kdcache("validate", url, "--deep").stdout
    assert val_keys[0] == val_keys[1] != val_keys[2]
    bad = kdcache("split", source, "--val-fraction", "1.5", "--out-train", tmp_path / "t",
                  "--out-val", tmp_path / "v", check=False)  # fmt: skip
    assert "--val-fraction" in one_line_error(bad)


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_subset_never_exceeds_max_tokens(caches, tmp_path: Path, fmt: str) -> None:
    source = caches[f"{fmt}-a"]
    for budget in (700, 512, 10**9):
        out = tmp_path / f"sub{budget}"
        line = kdcache("subset", source, "--max-tokens", str(budget), "--out", out).stdout
        manifest = json.loads((out / "manifest.json").read_text())
        tokens = sum(s["num_tokens"] for s in manifest["shards"])
        assert tokens <= budget and f"{tokens:,} tokens" in line
        kept = sequences(out)
        assert kept == sequences(source)[: len(kept)]
        assert "ok:" in kdcache("validate", out, "--deep").stdout
    assert manifest["dataset"]["num_tokens"] == open_cache(str(source)).manifest.num_tokens


@pytest.mark.parametrize("command", ["merge", "split", "subset"])
def test_help_teaches_with_an_example(command: str) -> None:
    out = kdcache(command, "--help").stdout
    assert "Example" in out and f"kdcache {command} " in out
    assert "--storage-option" in out and "--overwrite" in out
