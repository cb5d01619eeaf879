"""`kdcache export` as a user runs it, on a cache the real builder made with the tiny teacher
(top-k, samples, an extra temperature, two shards, a one-token document, a windowed one):
the Parquet files read back by DuckDB and `datasets` equal the cache's decoded records, and
the axolotl dataset has the columns, alignment and padded shapes axolotl's KD plugin uses
(src/axolotl/integrations/kd/: collator.py pads, kernels/liger.py pairs hidden state t with
target_*[t] and shifts only the labels)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas import open_cache
from schemas.export import LOGPROB_FLOOR, axolotl_table, export_cache
from tests.fixtures.caches import small_build_config
from tests.fixtures.cli import kdcache, one_line_error

pytestmark = pytest.mark.integration

PER_SEQUENCE = ("source_row", "source_start", "document_hash")


@pytest.fixture(scope="module")
def cache(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cache_builder import build

    rng = np.random.default_rng(5)
    docs = [rng.integers(1, 384, int(n)).tolist() for n in rng.integers(2, 120, 12)]
    docs[3] = [7]  # one token: nothing to predict, left out of the axolotl export
    root = tmp_path_factory.mktemp("export")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    settings = dict(max_length=64, shard_tokens=512, batch_tokens=256, samples=4)
    build(small_build_config(tiny_llama_dir, data, root / "cache", temperatures=(2.0,), **settings))
    return root / "cache"


@pytest.fixture(scope="module")
def sequences(cache: Path) -> list[dict[str, np.ndarray]]:
    """Every sequence of the cache, in cache order: each field's values for it."""
    c = open_cache(str(cache))
    out = []
    for info in c.shards:
        r = c.read_shard(info)
        for s in range(r.num_sequences):
            one = r.sequences(s, s + 1)
            out.append({f.name: v if f.dims[0] == "tokens" else v[0] for f, v in one.arrays()})
    assert len(c.shards) >= 2 and any(len(s["input_ids"]) == 1 for s in out)
    assert any(s["source_start"] > 0 for s in out)  # a document windowed over sequences
    return out


@pytest.fixture(scope="module")
def exports(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for to in ("parquet", "axolotl"):
        proc = kdcache("export", cache, "--to", to, root / to)
        assert proc.stdout.count("\n") == 1 and f"as {to}" in proc.stdout
        done[to] = root / to
    return done


def same(got: object, want: np.ndarray) -> None:
    """Equal values in the field's dtype (NaN equal to NaN)."""
    np.testing.assert_array_equal(np.asarray(got, dtype=want.dtype).reshape(want.shape), want)


def test_parquet_read_by_duckdb_and_datasets_equals_the_cache(exports, sequences, cache) -> None:
    import datasets
    import duckdb

    out = exports["parquet"]
    files = sorted(str(p) for p in out.glob("*.parquet"))
    assert [Path(f).name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    table = duckdb.sql(
        f"SELECT * FROM read_parquet({files!r}) ORDER BY sequence"
    ).to_arrow_table()  # Arrow: the bits as written
    assert set(table.column_names) == set(sequences[0]) | {"sequence"}
    assert table.column("sequence").to_pylist() == list(range(len(sequences)))
    for s, want in enumerate(sequences):
        for name, values in want.items():
            cell = table.column(name)[s]
            if name in PER_SEQUENCE:
                assert cell.as_py() == int(values), (name, s)
                continue
            flat = cell.values.flatten() if values.ndim == 2 else cell.values
            assert flat.to_numpy().tobytes() == values.tobytes(), (name, s)  # bit for bit

    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == len(sequences) and ds.features["document_hash"].dtype == "uint64"
    for s, row in enumerate(ds):
        assert row["sequence"] == s
        for name, want in sequences[s].items():
            same(row[name], want)

    info = json.loads((out / "_kdcache.json").read_text())
    manifest = open_cache(str(cache)).manifest
    assert info["cache"]["fingerprint"] == manifest.fingerprint
    assert (info["k"], info["vocab_size"]) == (8, manifest.layout.vocab_size)
    assert "input_ids[t + 1]" in info["alignment"] and info["files"] == [
        Path(f).name for f in files
    ]
    meta = json.loads(pq.read_schema(files[0]).metadata[b"kdcache"])
    assert meta["cache_fingerprint"] == manifest.fingerprint
    import pandas as pd

    assert len(pd.read_parquet(out)) == len(sequences)  # the folder; _kdcache.json ignored


def test_parquet_to_an_fsspec_url(cache, sequences) -> None:
    import fsspec

    result = export_cache(str(cache), "parquet", "memory://kdcache-export-test/out")
    fs = fsspec.filesystem("memory")
    tables = [
        pq.read_table(f, filesystem=fs)
        for f in sorted(fs.glob("/kdcache-export-test/out/*.parquet"))
    ]
    assert sum(t.num_rows for t in tables) == result.sequences == len(sequences)
    assert fs.isfile("/kdcache-export-test/out/_kdcache.json")
    fs.rm("/kdcache-export-test", recursive=True)


def test_axolotl_columns_lengths_and_alignment(exports, sequences) -> None:
    import datasets

    ds = datasets.load_from_disk(str(exports["axolotl"]))
    assert set(ds.column_names) == {
        "input_ids",
        "labels",
        "attention_mask",
        "target_token_ids",
        "target_logprobs",
        "target_mask",
    }
    kept = [s for s in sequences if len(s["input_ids"]) >= 2]
    assert len(ds) == len(kept) == len(sequences) - 1
    hits = 0
    for row, seq in zip(ds, kept, strict=True):
        ids, n = seq["input_ids"], len(seq["input_ids"])
        same(row["input_ids"], ids)
        same(row["labels"], ids)
        assert row["attention_mask"] == [1] * n
        # No shift: target_*[t] is the cache's top-k at t, which predicts input_ids[t + 1].
        same(row["target_token_ids"], seq["topk_ids"])
        got = np.asarray(row["target_logprobs"], dtype=np.float64)  # (T, k)
        raw = seq["topk_logprobs"].astype(np.float64)
        in_topk = np.log(np.exp(raw).sum(axis=1, keepdims=True))  # log(1 - tail), decoded
        np.testing.assert_allclose(got, raw - in_topk, atol=1e-5)
        np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)
        mask = np.asarray(row["target_mask"])
        assert mask.shape == (n, 8) and (mask[:-1] == 1).all() and (mask[-1] == 0).all()
        assert np.isnan(seq["label_logprob"][-1]) and not np.isnan(seq["label_logprob"][:-1]).any()
        # Where the next token is in the top-k, its target is the teacher's label log-prob
        # (exact in the cache), renormalised: the targets describe token t + 1.
        for t in range(n - 1):
            slot = np.flatnonzero(seq["topk_ids"][t] == ids[t + 1])
            if slot.size:
                hits += 1
                want = seq["label_logprob"][t] - in_topk[t, 0]
                assert abs(got[t, slot[0]] - want) < 0.05, (t, got[t, slot[0]], want)
    assert hits > 0


def kd_collate(features: list[dict]) -> dict:
    """Right padding as axolotl's DataCollatorForKD (collator.py): labels -100, input ids and
    target ids 0, attention and target masks 0, target log-probs -1e9."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    k = len(features[0]["target_token_ids"][0])
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    batch = {
        name: torch.tensor([f[name] + [pad] * (longest - len(f[name])) for f in features])
        for name, pad in pads.items()
    }
    for name, pad, dtype in (
        ("target_token_ids", 0, torch.long),
        ("target_logprobs", -1e9, torch.float),
        ("target_mask", 0, torch.int),
    ):
        rows = [f[name] + [[pad] * k] * (longest - len(f[name])) for f in features]
        batch[name] = torch.tensor(rows, dtype=dtype)
    return batch


def test_axolotl_batches_have_the_shapes_its_loss_takes(exports) -> None:
    import datasets
    import torch

    ds = datasets.load_from_disk(str(exports["axolotl"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=kd_collate)
    valid = 0
    for batch in loader:
        b, t = batch["input_ids"].shape
        assert batch["labels"].shape == batch["attention_mask"].shape == (b, t)
        for name in ("target_token_ids", "target_logprobs", "target_mask"):
            assert batch[name].shape == (b, t, 8), name
        # The CE term shifts labels by one (kernels/liger.py: true_labels[:, 1:]); a position
        # with a target is exactly one whose shifted label is a token.
        shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        assert torch.equal(batch["target_mask"][..., 0].bool(), shifted != -100)
        # Forward KL over the top-k, as topk_logprob/forward_kl.py computes it.
        student = torch.log_softmax(torch.randn(b, t, 384), dim=-1)
        at_ids = torch.gather(student, -1, batch["target_token_ids"])  # (B, T, k)
        keep = batch["target_mask"].bool()
        teacher = batch["target_logprobs"][keep]
        loss = (teacher.exp() * (teacher - at_ids[keep])).sum() / keep[..., 0].sum()
        assert torch.isfinite(loss) and loss > 0
        valid += int(keep[..., 0].sum())
    assert valid == sum(len(ids) - 1 for ids in ds["input_ids"])


def test_axolotl_temperature_and_minus_infinity(cache) -> None:
    records = open_cache(str(cache)).read_shard(0)
    lp = records.topk_logprobs.copy()
    lp[:, -1] = -np.inf  # a vocabulary entry the teacher rules out
    records = replace(records, topk_logprobs=lp)
    table, left_out = axolotl_table(records, temperature=2.0)
    got = np.concatenate([np.stack(row) for row in table.column("target_logprobs").to_pylist()])
    kept = np.repeat(np.diff(records.seq_offsets) >= 2, np.diff(records.seq_offsets))
    scaled = lp[kept].astype(np.float64) / 2.0
    top = scaled[:, :-1]
    want = top - np.log(np.exp(top).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got[:, :-1], want, atol=1e-5)
    assert (got[:, -1] == LOGPROB_FLOOR).all()
    assert left_out == int((np.diff(records.seq_offsets) < 2).sum())


def test_help_says_the_alignment_and_what_axolotl_loses() -> None:
    out = kdcache("export", "--help").stdout
    assert "input_ids[t + 1]" in out and "target_*[t] describe token t + 1" in out
    assert "src/axolotl/integrations/kd/trainer.py" in out and "Lost:" in out
    assert "pip install 'kdcache[datasets]'" in out


def test_export_refusals_are_one_line(cache, exports, tmp_path: Path) -> None:
    from kdcache._commands_export import TARGETS
    from schemas.export import EXPORT_TARGETS

    assert TARGETS == EXPORT_TARGETS
    out = tmp_path / "out"
    line = one_line_error(kdcache("export", cache, "--to", "csv", out, check=False))
    assert "--to" in line and "parquet" in line and "axolotl" in line

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_line_error(kdcache("export", cache, "--to", "parquet", out, check=False))
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    line = one_line_error(
        kdcache("export", cache, "--to", "parquet", out, "--overwrite", check=False)
    )
    assert "_kdcache.json" in line and (out / "notes.txt").exists()

    line = one_line_error(kdcache("export", cache, "--to", "parquet", cache / "x", check=False))
    assert "inside the cache" in line

    line = one_line_error(
        kdcache(
            "export", cache, "--to", "parquet", tmp_path / "t", "--temperature", "2", check=False
        )
    )
    assert "--temperature" in line and "axolotl" in line

    building = tmp_path / "building"
    shutil.copytree(cache, building)
    manifest = json.loads((building / "manifest.json").read_text())
    (building / "manifest.json").write_text(json.dumps({**manifest, "status": "building"}))
    line = one_line_error(
        kdcache("export", building, "--to", "parquet", tmp_path / "b", check=False)
    )
    assert str(building) in line and "still being built" in line and "kdcache build" in line
    assert not (tmp_path / "b").exists()

    fake = tmp_path / "no-datasets" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('datasets is not installed')\n")
    proc = kdcache(
        "export",
        cache,
        "--to",
        "axolotl",
        tmp_path / "a",
        check=False,
        env={"PYTHONPATH": str(fake.parent)},
    )
    assert "pip install 'kdcache[datasets]'" in one_line_error(proc)
    assert not (tmp_path / "a").exists()


def test_overwrite_replaces_an_earlier_export(cache, exports, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(exports["parquet"], out)
    (out / "part-00009.parquet").write_bytes(b"stale")
    kdcache("export", cache, "--to", "axolotl", out, "--overwrite")
    assert not (out / "part-00009.parquet").exists() and (out / "state.json").exists()
    assert json.loads((out / "_kdcache.json").read_text())["kdcache_export"]["to"] == "axolotl"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging removed
