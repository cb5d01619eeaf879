"""A cache handed to another team: what its manifest says (and must not say), what it measured
about itself, the content keys, the tokenizer copy, shards that do not belong, and the same
commands against object storage with --storage-option.

Every command runs as a user runs it: the installed `kdcache` in a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from schemas import open_cache
from schemas.encodings import TopkEncoding
from schemas.record import document_hash
from schemas.storage import public_location
from tests.fixtures.cli import kdcache, one_line_error
from tests.fixtures.models import tiny_student_config
from tests.fixtures.s3 import cli_storage_options

pytestmark = pytest.mark.integration

SMALL = ["--max-length", "64", "--top-k", "8", "--shard-tokens", "512", "--batch-tokens", "256"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """Pre-tokenized documents (used exactly as given), some longer than one window."""
    rng = np.random.default_rng(7)
    docs = [rng.integers(1, 384, int(n)).tolist() for n in rng.integers(20, 150, 24)]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    return path, docs


def build(teacher: Path, data: Path, out: Path | str, *extra: str) -> None:
    kdcache("build", "--teacher", teacher, "--dataset", data, "--out", out, *SMALL, *extra,
            "--no-progress")  # fmt: skip


@pytest.fixture(scope="module")
def q8c_cache(tiny_llama_dir: Path, documents, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q8c") / "cache"
    build(tiny_llama_dir, documents[0], out, "--format", "arrow")
    return out


@pytest.fixture(scope="module")
def exact_cache(tiny_llama_dir: Path, documents, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exact") / "cache"
    build(tiny_llama_dir, documents[0], out, "--value-encoding", "float32")
    return out


def train_args(cache: Path | str, tmp_path: Path) -> list[str]:
    return ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--student-config",
            str(tiny_student_config(tmp_path)), "--max-steps", "2", "--batch-tokens", "256",
            "--no-progress"]  # fmt: skip


# -- what the manifest records ---------------------------------------------------------------


def test_manifest_records_nothing_local_and_names_its_producer(
    q8c_cache: Path, tiny_llama_dir: Path, documents
) -> None:
    text = (q8c_cache / "manifest.json").read_text()
    for local in (str(tiny_llama_dir), str(documents[0].parent), str(q8c_cache.parent), "/tmp"):
        assert local not in text
    m = json.loads(text)
    assert m["created_by"] == f"kdcache {version('kdcache')}"
    assert m["teacher"]["name_or_path"] == tiny_llama_dir.name
    assert (
        m["dataset"]["source"] == "docs.jsonl" and m["build"]["config"]["dataset"] == "docs.jsonl"
    )
    assert "out" not in m["build"]["config"]


@pytest.mark.parametrize(
    "given,recorded",
    [
        ("s3://AKIAX:s3cr3t@bucket/c?versionId=3&X-Amz-Signature=ab&token=z#f", "s3://bucket/c?versionId=3"),
        ("https://user:pw@host:9000/a?sig=1&sv=2020", "https://host:9000/a?sv=2020"),
        ("gs://bucket/path?access_token=abc", "gs://bucket/path"),
        ("/home/alice/data/*.jsonl", "*.jsonl"),
        ("./corpus/", "corpus"),
        ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
        ("embedded:python-docs:train", "embedded:python-docs:train"),
    ],
)  # fmt: skip
def test_public_location_drops_credentials_and_local_paths(given: str, recorded: str) -> None:
    assert public_location(given) == recorded


# -- fidelity --------------------------------------------------------------------------------


def test_fidelity_is_measured_from_exact_values(q8c_cache: Path, exact_cache: Path) -> None:
    lossy, exact = open_cache(str(q8c_cache)), open_cache(str(exact_cache))
    a, b = lossy.manifest.fidelity, exact.manifest.fidelity
    assert a is not None and b is not None
    # The teacher's side is the same whatever the encoding: tail, entropy, label coverage.
    assert (a.positions, a.label_in_topk) == (b.positions, b.label_in_topk)
    assert a.mean_tail_mass == pytest.approx(b.mean_tail_mass, rel=1e-12)
    assert a.mean_topk_entropy_nats == pytest.approx(b.mean_topk_entropy_nats, rel=1e-6)
    # ... and agrees with what the exact cache stores.
    records = [exact.read_shard(i) for i in range(len(exact.shards))]
    tail = np.concatenate([np.exp(r.log_tail.astype(np.float64)) for r in records])
    assert b.mean_tail_mass == pytest.approx(tail.mean(), rel=1e-9)
    hits = labels = 0
    for r in records:
        for s in range(r.num_sequences):
            lo, hi = r.seq_offsets[s], r.seq_offsets[s + 1]
            nxt = r.input_ids[lo + 1 : hi]
            hits += int((r.topk_ids[lo : hi - 1] == nxt[:, None]).any(axis=1).sum())
            labels += int(hi - lo - 1)
    assert b.label_in_topk == hits / labels
    # The encoding's side: float32 loses nothing, q8c loses a little, within its bound.
    assert b.encoding_max_abs_logprob_error == 0.0 and b.encoding_mean_topk_kl == 0.0
    bound = TopkEncoding(ids="uint16", values="q8c").max_abs_error()
    assert 0 < a.encoding_max_abs_logprob_error <= bound
    assert 0 < a.encoding_mean_topk_kl < 1e-3


def test_inspect_shows_fidelity_from_the_manifest_alone(q8c_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "no-shards"
    shutil.copytree(q8c_cache, cache)
    shutil.rmtree(cache / "shards")  # inspect must not need them
    out = kdcache("inspect", cache).stdout
    assert "fidelity     tail mass" in out and "encoding     max |log-prob error|" in out
    info = json.loads(kdcache("inspect", cache, "--json").stdout)
    assert info["fidelity"]["positions"] == info["tokens"] and info["teacher_stats"] is None


# -- content keys ----------------------------------------------------------------------------


def test_every_window_carries_its_document_content_key(q8c_cache: Path, documents) -> None:
    _, docs = documents
    cache = open_cache(str(q8c_cache))
    keys = {document_hash(np.array(d)): d for d in docs}
    seen = set()
    for i in range(len(cache.shards)):
        r = cache.read_shard(i)
        for s in range(r.num_sequences):
            doc = keys[int(r.document_hash[s])]  # a consumer finds it from their own copy
            start = int(r.source_start[s])
            window = r.input_ids[r.seq_offsets[s] : r.seq_offsets[s + 1]]
            assert window.tolist() == doc[start : start + len(window)]
            seen.add(int(r.document_hash[s]))
    assert seen == set(keys)


# -- the tokenizer copy ----------------------------------------------------------------------


def test_tokenizer_copy_is_checksummed_and_checked_before_training(
    q8c_cache: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "c"
    shutil.copytree(q8c_cache, cache)
    listed = {f.name: f for f in open_cache(str(cache)).manifest.tokenizer.files}
    assert "tokenizer.json" in listed
    assert (
        listed["tokenizer.json"].nbytes == (cache / "tokenizer" / "tokenizer.json").stat().st_size
    )
    tok = cache / "tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:-100])  # truncated in transit
    line = one_line_error(kdcache(*train_args(cache, tmp_path), check=False))
    assert "tokenizer/tokenizer.json" in line and "checksum" in line


# -- shards that do not belong ---------------------------------------------------------------


def _forge(cache: Path, index: int, foreign: Path, foreign_index: int) -> None:
    """Put another cache's shard in place of shard `index`, its manifest entry edited to match
    (so sizes and checksums agree: what a careless copy plus a hand edit produce)."""
    m = json.loads((cache / "manifest.json").read_text())
    f = json.loads((foreign / "manifest.json").read_text())["shards"][foreign_index]
    entry = m["shards"][index]
    target = cache / entry["name"]
    target.unlink()
    shutil.copyfile(foreign / f["name"], target)
    for key in ("num_tokens", "num_sequences", "nbytes", "checksum"):
        entry[key] = f[key]
    (cache / "manifest.json").write_text(json.dumps(m))


def test_a_shard_from_another_cache_is_refused_by_validate_and_train(
    q8c_cache: Path, tiny_llama_dir: Path, documents, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    build(tiny_llama_dir, documents[0], other, "--format", "arrow", "--seed", "3",
          "--samples", "2")  # fmt: skip
    cache = tmp_path / "c"
    shutil.copytree(q8c_cache, cache)
    _forge(cache, 1, other, 1)
    problems = kdcache("validate", cache, check=False)
    assert problems.returncode == 1
    assert "shards/000001.arrow" in problems.stderr and "does not belong" in problems.stderr
    line = one_line_error(kdcache(*train_args(cache, tmp_path), check=False))
    assert "000001.arrow" in line and "does not belong" in line


def test_a_layout_edited_in_the_manifest_is_caught_by_every_shard(
    q8c_cache: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "c"
    shutil.copytree(q8c_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["layout"]["k"] = 6  # the shards hold 8
    (cache / "manifest.json").write_text(json.dumps(m))
    line = one_line_error(kdcache(*train_args(cache, tmp_path), check=False))
    assert "shards/0000" in line and ("layout" in line or "cache_fingerprint" in line)


# -- object storage with --storage-option ----------------------------------------------------


def test_build_inspect_validate_train_on_s3_with_storage_options(
    s3_options: dict, tiny_llama_dir: Path, documents, tmp_path: Path
) -> None:
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("kdcache-sharing")
    url = "s3://kdcache-sharing/cache"
    opts = cli_storage_options(s3_options)
    build(tiny_llama_dir, documents[0], url, *opts)
    manifest = s3fs.S3FileSystem(**s3_options).cat_file("kdcache-sharing/cache/manifest.json")
    assert b"endpoint_url" not in manifest and b'"x"' not in manifest
    assert json.loads(kdcache("inspect", url, "--json", *opts).stdout)["fidelity"]["positions"] > 0
    kdcache("validate", url, "--deep", *opts)
    temp = tmp_path / "tmp"
    temp.mkdir()
    run = kdcache(*train_args(url, tmp_path), *opts, env={"TMPDIR": str(temp)})
    assert "trained 2 steps" in run.stdout
    left = [name for name in os.listdir(temp) if name.startswith("kdcache")]
    assert left == [], "training from S3 left kdcache files in the temp directory"
    missing = kdcache("inspect", url, check=False)  # no endpoint: a clear refusal, no traceback
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
