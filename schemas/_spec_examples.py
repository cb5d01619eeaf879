"""What FORMAT.md shows by example: a small cache written by the real writers, and programs
that read a cache without kdcache.

The example cache (`write_examples`) is written to a temporary folder and read back, so the
directory tree, the Zarr codecs and the shard metadata in FORMAT.md are what kdcache writes.
The programs are text, not kdcache code: `schemas.spec` copies them into FORMAT.md, and the
tests (tests/schemas/test_format_spec.py, tests/integration/test_interop.py) extract them from
FORMAT.md and run them in fresh processes where importing kdcache's packages or torch fails.
Each uses only numpy, pyarrow, zarr and the reader it shows.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import zarr

from schemas import _spec_tables, backend, cache, manifest, record
from schemas.encodings import default_encoding
from schemas.fidelity import ShardFidelity, summarize
from schemas.writer import CacheWriter

_TOKENIZER = {"tokenizer.json": b'{"model": {"type": "BPE"}}\n'}


def _example_draft(fmt: str) -> manifest.Manifest:
    """The manifest of the small example cache this page reads its examples from."""
    layout = _spec_tables.EXAMPLE_LAYOUT
    return manifest.Manifest(
        format=fmt,
        teacher=manifest.TeacherInfo(
            name_or_path="org/teacher", weights_sha256="sha256:" + "1" * 64, dtype="bfloat16"
        ),
        tokenizer=manifest.TokenizerInfo(
            name_or_path="org/teacher",
            fingerprint="sha256:" + "2" * 64,
            vocab_size=layout.vocab_size,
            files=tuple(cache.file_info(n, b) for n, b in _TOKENIZER.items()),
        ),
        dataset=manifest.DatasetInfo(
            source="corpus.jsonl", fingerprint="sha256:" + "3" * 64, num_documents=2, num_tokens=3
        ),
        build=manifest.BuildSettings(
            top_k=layout.k,
            max_length=2,
            num_samples=layout.num_samples,
            temperatures=layout.temperatures,
        ),
        layout=layout,
        encoding=default_encoding(layout.vocab_size).to_json(),
    )


def _example_records(layout: record.Layout) -> record.ShardRecords:
    """Two sequences, of 2 and 1 tokens, with the exact log-softmax of made-up logits."""
    n, k, s = 3, layout.k, layout.num_samples
    logits = ((np.arange(layout.vocab_size) * np.arange(7, 7 + n)[:, None]) % 13) * 0.25
    lse = np.logaddexp.reduce(logits, axis=1)  # (N,)
    logp = logits - lse[:, None]  # (N, V)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]  # (N, k)
    top = np.take_along_axis(logp, ids, axis=1)
    hashes = [record.document_hash(np.array(doc)) for doc in ([5, 9], [2])]
    return record.ShardRecords(
        input_ids=np.array([5, 9, 2], np.int32),
        topk_ids=ids.astype(np.int32),
        topk_logprobs=top.astype(np.float32),
        lse=lse.astype(np.float32),
        log_tail=np.log1p(-np.exp(top).sum(axis=1)).astype(np.float32),
        label_logprob=np.array([logp[0, 9], np.nan, np.nan], np.float32),
        source_row=np.array([0, 1], np.int64),
        source_start=np.array([0, 0], np.int64),
        seq_offsets=np.array([0, 2, 3], np.int64),
        temp_lse=np.stack(
            [np.logaddexp.reduce(logits / t, axis=1) for t in layout.temperatures], axis=1
        ).astype(np.float32),
        sample_ids=ids[:, :s].astype(np.int32),
        sample_counts=np.ones((n, s), np.uint16),
        sample_logprobs=top[:, :s].astype(np.float32),
        document_hash=np.array(hashes, np.uint64),
    )


@dataclasses.dataclass(frozen=True)
class Written:
    """What the real writers put on disk for the example cache."""

    trees: dict[str, list[str]]
    """format -> every path under the cache root, relative; folders end in "/"."""
    metadata: dict[str, dict[str, object]]
    """format -> the shard's own metadata, read back."""
    zarr_arrays: dict[str, dict[str, object]]
    """Array name -> its zarr.json metadata, in the Zarr shard."""
    staged_name: str
    """A shard's name under staging/ while it is written, its random tag replaced."""


def write_examples() -> Written:
    """Write the example cache in every format to a temporary folder and read it back."""
    trees, metadata, arrays, staged = {}, {}, {}, ""
    with tempfile.TemporaryDirectory(prefix="kdcache-spec-") as tmp:
        for fmt in cache.BACKENDS:
            root = Path(tmp, fmt)
            writer = CacheWriter(str(root), _example_draft(fmt))
            writer.store_tokenizer(_TOKENIZER)
            with writer.shard_writer(0) as w:
                staged = staged or Path(w.tmp_path).name
                w.write(_example_records(writer.draft.layout))
                writer.commit_shard(w)
            writer.finalize(1)
            trees[fmt] = sorted(
                p.relative_to(root).as_posix() + ("/" if p.is_dir() else "")
                for p in root.rglob("*")
            )
            metadata[fmt] = cache.open_cache(str(root)).reader(0).identity()
            if fmt == "zarr":
                group = zarr.open_group(str(root / backend.shard_name(0, ".zarr")), mode="r")
                arrays = {name: a.metadata.to_dict() for name, a in sorted(group.arrays())}
    tag = staged.split("-", 1)[1].split(".", 1)[0]
    return Written(trees, metadata, arrays, staged.replace(tag, "<8 hex digits>"))


def example_manifest() -> manifest.Manifest:
    """A complete manifest of the example cache, with made-up sizes, checksum and fidelity."""
    shard = manifest.ShardInfo(
        name=backend.shard_name(0, ".arrow"),
        index=0,
        num_tokens=3,
        num_sequences=2,
        nbytes=9000,
        checksum="sha256:" + "4" * 64,
        fidelity=ShardFidelity(
            positions=3,
            tail_mass_sum=0.75,
            topk_entropy_sum=3.75,
            label_positions=1,
            label_in_topk=1,
            sampled_positions=1,
            max_abs_logprob_error=0.0078125,
            topk_kl_sum=0.0001,
        ),
    )
    return dataclasses.replace(
        _example_draft("arrow"),
        created_by="kdcache 0.2.0",
        status="complete",
        shards=(shard,),
        fidelity=summarize([shard.fidelity]),
    )


READER = '''\
# Decode the teacher's top-k from one kdcache shard: numpy + pyarrow (+ zarr for .zarr).
# usage: python read_kdcache.py SHARD [TOKEN]   (SHARD: my-cache/shards/000000.arrow)
import json
import sys

import numpy as np
import pyarrow as pa


def load(path):
    """(the shard's own metadata, column name -> numpy array with the token axis first)."""
    if path.rstrip("/").endswith(".zarr"):
        import zarr

        group = zarr.open_group(path, mode="r")
        return dict(group.attrs["kdcache"]), lambda name: group[name][...]
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()  # one row per sequence
    meta = json.loads(table.schema.metadata[b"kdcache"])

    def column(name):  # list<item> per sequence -> (tokens, *item shape)
        values, shape = table.column(name).combine_chunks().flatten(), []
        while pa.types.is_fixed_size_list(values.type):
            shape.append(values.type.list_size)
            values = values.flatten()
        return values.to_numpy(zero_copy_only=False).reshape(-1, *shape)

    return meta, column


def values(enc, column, prefix, kind):
    """Log-probs float32 (N, width) stored under `prefix` in value encoding `kind`."""
    if kind == "float32":
        return column(f"{prefix}s")
    if kind in ("float16", "bfloat16"):  # bit patterns, differenced along the row (mod 2**16)
        bits = np.cumsum(column(f"{prefix}_{kind}_bits"), axis=1, dtype=np.uint16)
        if kind == "float16":
            return bits.view(np.float16).astype(np.float32)
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    # q8, q8c, q8c-coarse: 8-bit codes of the distance below the row's exact first value
    step, knee, max_code = (enc["value_params"][p] for p in ("step", "knee", "max_code"))
    c = np.arange(max_code + 1, dtype=np.float64)
    x = c * step if knee is None else knee * np.expm1(c * step / knee)
    codes = np.cumsum(column(f"{prefix}_codes"), axis=1, dtype=np.int16)
    return column(f"{prefix}_top1")[:, None] - x.astype(np.float32)[codes]


def decode(meta, column):
    """(ids int32 (N, k), log-probs float32 (N, k), lse float32 (N,)), teacher rank order."""
    enc, lse = meta["encoding"], column("lse")
    if meta["layout"]["k"] == 0:  # a samples-only cache (format 3.0)
        return np.zeros((len(lse), 0), np.int32), np.zeros((len(lse), 0), np.float32), lse
    if enc["ids"] == "sorted":  # ascending ids as gaps, rank order as a Lehmer code (slow)
        ranked = np.cumsum(column("topk_id_gaps"), axis=1, dtype=np.int32)
        slots = []
        for code in column("topk_id_lehmer").tolist():
            free = list(range(len(code)))
            slots.append([free.pop(d) for d in code])
        ids = np.take_along_axis(ranked, np.array(slots, np.int64).reshape(ranked.shape), 1)
    else:  # uint16 or uint32
        ids = column("topk_ids").astype(np.int32)
    return ids, values(enc, column, "topk_logprob", enc["values"]), lse


def samples(meta, column):
    """(distinct ids, counts, log-probs) of the draws; padding has count 0. Format 3.0
    (layout.compact_samples) lists only the draws outside the top-k, log-probs in the cache's
    value encoding; 2.x lists every draw, float32 log-probs."""
    compact = meta["layout"].get("compact_samples", False)
    kind = meta["encoding"]["values"] if compact else "float32"
    lp = values(meta["encoding"], column, "sample_logprob", kind)
    return column("sample_ids").astype(np.int32), column("sample_counts"), lp


if __name__ == "__main__":
    ids, logprobs, lse = decode(*load(sys.argv[1]))
    t = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for i, lp in zip(ids[t].tolist(), logprobs[t].tolist()):
        print(f"id {i:>7}  logprob {lp:9.4f}  prob {np.exp(lp):.4f}  logit {lp + lse[t]:9.4f}")
'''
"""The decoder of FORMAT.md: every id and value encoding, parameters from the shard."""

CHECKSUM = '''\
import hashlib
from pathlib import Path


def shard_checksum(path):
    """The manifest's `checksum` of a shard: one file (Arrow) or a folder of files (Zarr)."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    tree = hashlib.sha256()
    files = [f for f in path.rglob("*") if f.is_file()]
    for f in sorted(files, key=lambda f: f.relative_to(path).as_posix()):
        digest = "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
        tree.update(f"{f.relative_to(path).as_posix()}\\0{digest}\\0{f.stat().st_size}\\n".encode())
    return "sha256:" + tree.hexdigest()
'''
"""Recomputes a shard's checksum as `schemas.storage.checksum_file` / `checksum_tree` do."""

FINGERPRINT = '''\
import hashlib
import json


def cache_fingerprint(manifest):
    """The fingerprint of a cache (its manifest as a dict), which its shards' metadata names."""
    keep = ("format", "teacher", "tokenizer", "dataset", "build", "layout", "encoding")
    m = json.loads(json.dumps({key: manifest[key] for key in keep}))  # a deep copy
    if m["teacher"].get("weights_sha256"):  # a hash names the teacher, not a path
        del m["teacher"]["name_or_path"]
    del m["tokenizer"]["name_or_path"], m["dataset"]["source"], m["build"]["config"]
    m["tokenizer"].pop("files", None)  # the bytes vary with library versions; absent in 1.x
    if not m["layout"].get("content_keys"):  # absent in 1.x caches
        m["layout"].pop("content_keys", None)
    text = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
'''
"""Recomputes `Manifest.fingerprint` from manifest.json."""

SETUP = """\
import json
from pathlib import Path

cache = Path("my-cache")  # a kdcache cache directory
manifest = json.loads((cache / "manifest.json").read_text())
paths = [str(cache / shard["name"]) for shard in manifest["shards"]]  # committed, in order
"""
"""Every interop block below starts from these names (`paths`: the committed shards)."""

INTEROP: dict[str, tuple[str, str, str]] = {
    "pyarrow": (
        "pyarrow",
        "Arrow shards. `open_file`, not `open_stream`: a shard is an IPC *file*.",
        """\
import pyarrow as pa
import pyarrow.compute as pc  # pyarrow does not import its compute module by itself

table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(p)).read_all() for p in paths)
tokens = pc.list_value_length(table["input_ids"])  # one row per sequence
print(table.num_rows, "sequences,", pc.sum(tokens).as_py(), "tokens")
""",
    ),
    "pandas": (
        "pandas",
        "Arrow shards. An Arrow IPC file is a Feather v2 file; list columns become "
        "object columns of numpy arrays.",
        """\
import pandas as pd

df = pd.concat([pd.read_feather(p) for p in paths], ignore_index=True)
df["tokens"] = df["input_ids"].map(len)
top1 = df["topk_ids"].explode().dropna().map(lambda ids: int(ids[0]))  # top-1 id, every token
print(top1.value_counts().head())
""",
    ),
    "polars": (
        "Polars",
        "Arrow shards. Fixed-size lists become `pl.Array` columns.",
        """\
import polars as pl

df = pl.concat([pl.read_ipc(p) for p in paths])
per_sequence = df.select("source_row", tokens=pl.col("input_ids").list.len())
top1 = df.select(top1=pl.col("topk_ids").explode().arr.first())["top1"].value_counts(sort=True)
print(per_sequence.head(), top1.head())
""",
    ),
    "duckdb": (
        "DuckDB",
        "Arrow shards. DuckDB does not open Arrow IPC files itself; it scans a pyarrow "
        "table named in the query (its replacement scan of Python variables). DuckDB lists "
        "count from 1.",
        """\
import duckdb
import pyarrow as pa

shards = pa.concat_tables(pa.ipc.open_file(pa.memory_map(p)).read_all() for p in paths)
tokens = duckdb.sql("SELECT source_row, len(input_ids) AS tokens FROM shards").fetchall()
top1 = duckdb.sql(
    "SELECT ids[1] AS top1, count(*) AS n FROM (SELECT unnest(topk_ids) AS ids FROM shards) "
    "GROUP BY top1 ORDER BY n DESC, top1 LIMIT 10"
).fetchall()
(p_top1,) = duckdb.sql(  # the mean top-1 probability (exact in q8 and q8c encodings)
    "SELECT avg(exp(lp)) FROM (SELECT unnest(topk_logprob_top1) AS lp FROM shards)"
).fetchall()[0]
print(tokens[:3], top1[:3], p_top1)
""",
    ),
    "datasets": (
        "Hugging Face datasets",
        "Arrow shards. `Dataset.from_file` reads only the IPC "
        "*stream* format and fails on a shard; these two calls work. The first holds the "
        "decompressed shards in memory; the second (in `datasets` versions whose `arrow` "
        "loader falls back to the IPC file format) converts them once into the `datasets` "
        "cache, uncompressed and memory-mapped from there on.",
        """\
import datasets
import pyarrow as pa

ds = datasets.Dataset(
    pa.concat_tables(pa.ipc.open_file(pa.memory_map(p)).read_all() for p in paths)
)
ds_cached = datasets.load_dataset("arrow", data_files=paths, split="train")
print(ds, ds_cached.with_format("numpy")[0]["topk_ids"][:2])
""",
    ),
    "zarr": (
        "zarr",
        "Zarr shards, with the default plain-id encoding (`topk_ids`).",
        """\
import zarr

group = zarr.open_group(paths[0], mode="r")  # one group per shard, one array per column
offsets = group["seq_offsets"][:]  # (S + 1,): sequence s is tokens offsets[s]:offsets[s + 1]
s = 1
ids = group["topk_ids"][offsets[s] : offsets[s + 1]]  # (tokens of sequence s, k), rank order
print(group.attrs["kdcache"]["encoding"], ids[:2])
""",
    ),
}
"""Name -> (title, what to know, code): one block per reader; tests/integration/test_interop.py
runs each."""
