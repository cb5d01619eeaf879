"""Load: a cache of ten million tokens through the training data path, and a manifest of ten
thousand shards opened.

    python -m bench.load            # 10M tokens, 10,000 shards; writes bench/results/load.json
    python -m bench.load --quick    # 1M tokens, 2,000 shards
    python -m bench.load --format zarr

Setup. Synthetic records (k=8, V=512, 512-token sequences, the builder's invariants: distinct
top-k ids in rank order, log-probs <= 0, a tail consistent with them, each label's
log-probability equal to its entry in the previous position's top-k, NaN at sequence ends)
go through the real writer (`CacheWriter`, `ShardWriter.write`: fidelity measured, values
encoded with the default q8c, zstd/Blosc compressed) into shards of `SHARD_TOKENS` tokens.
Positions draw from a pool of 4,096 precomputed distributions, so writing costs what encoding
and compressing cost, not what a softmax over the vocabulary would.

Measured. The stream is `ShardStream` (shuffled, a buffer of `BUFFER_SEQUENCES`, every shard
checksummed and content-checked) -> `batches` -> `collate` (numpy to torch, padding), one core,
no model: tokens/s is the tokens collated over the wall time. Memory: the tracemalloc peak
(every numpy array is traced) after a quarter of the cache and at the end, and the process's
peak RSS (VmHWM, which includes the interpreter, torch and the memory-mapped Arrow pages),
measured in a fresh process. The manifest: `schemas.open_cache` on a manifest.json of N shard
entries (copies of a real entry, fidelity included), best of three, and `kdcache inspect` on
it as a user runs it (a fresh process, imports included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from schemas.backend import shard_name
from schemas.cache import CacheWriter, open_cache
from schemas.encodings import default_encoding
from schemas.fidelity import summarize
from schemas.manifest import (
    BuildSettings,
    DatasetInfo,
    Manifest,
    TeacherInfo,
    TokenizerInfo,
    to_json,
)
from schemas.record import Layout, ShardRecords

RESULTS = Path(__file__).resolve().parent / "results"
K, VOCAB, SEQ = 8, 512, 512
SHARD_TOKENS = 1 << 17
"""131,072 tokens a shard: 77 shards for 10M tokens (a build's default is 1M)."""
BUFFER_SEQUENCES = 256
BATCH_TOKENS = 8192
POOL = 4096


def draft(fmt: str, num_tokens: int = 0, shard_tokens: int = SHARD_TOKENS) -> Manifest:
    """The manifest of a synthetic build (no shards yet)."""
    layout = Layout(k=K, vocab_size=VOCAB, content_keys=True)
    return Manifest(
        format=fmt,
        teacher=TeacherInfo(name_or_path="synthetic", weights_sha256="sha256:" + "0" * 64),
        tokenizer=TokenizerInfo(name_or_path="synthetic", fingerprint="sha256:1", vocab_size=VOCAB),
        dataset=DatasetInfo(
            source="synthetic",
            fingerprint="sha256:2",
            num_documents=-(-num_tokens // SEQ),
            num_tokens=num_tokens,
        ),
        build=BuildSettings(top_k=K, max_length=SEQ, shard_tokens=shard_tokens),
        layout=layout,
        encoding=default_encoding(VOCAB).to_json(),
    )


def distribution_pool(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (P, K) int32, log-probs (P, K) float32, log-tail (P,) float32): P top-k lists of
    distinct ids in rank order whose probabilities leave a tail of 2-60 %."""
    ids = np.argsort(rng.random((POOL, VOCAB)), axis=1)[:, :K].astype(np.int32)
    weights = -np.sort(-rng.dirichlet(np.full(K + 1, 0.7), size=POOL)[:, :K], axis=1)
    kept = rng.uniform(0.4, 0.98, POOL)[:, None]
    probs = weights / weights.sum(axis=1, keepdims=True) * kept  # (P, K) decreasing
    logprobs = np.minimum(np.log(probs), 0.0).astype(np.float32)
    exact = np.exp(logprobs.astype(np.float64)).sum(axis=1)
    return ids, logprobs, np.log1p(-exact).astype(np.float32)


def synthetic_records(
    pool: tuple[np.ndarray, np.ndarray, np.ndarray], num_sequences: int, seed: int
) -> ShardRecords:
    """`num_sequences` sequences of SEQ tokens whose records satisfy the format's invariants
    (`schemas.checks`, deep checks included)."""
    ids, logprobs, tail = pool
    rng = np.random.default_rng(seed)
    n = num_sequences * SEQ
    pick = rng.integers(0, POOL, n)  # (N,) which distribution each position has
    rank = rng.integers(0, K, n)  # (N,) the rank of the next token in that top-k
    topk_ids, topk_lp = ids[pick], logprobs[pick]  # (N, K)
    rows = np.arange(n)
    input_ids = np.empty(n, dtype=np.int32)
    input_ids[0] = rng.integers(0, VOCAB)
    input_ids[1:] = topk_ids[rows[:-1], rank[:-1]]  # the next token is in the top-k ...
    label = topk_lp[rows, rank].copy()  # ... at the log-prob the top-k lists for it
    offsets = np.arange(0, n + 1, SEQ, dtype=np.int64)
    label[offsets[1:] - 1] = np.nan  # no next token at a sequence's end
    return ShardRecords(
        input_ids=input_ids,
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        lse=rng.uniform(4.0, 12.0, n).astype(np.float32),
        log_tail=tail[pick],
        label_logprob=label,
        source_row=np.arange(num_sequences, dtype=np.int64) + seed * num_sequences,
        source_start=np.zeros(num_sequences, dtype=np.int64),
        document_hash=rng.integers(0, 2**63, num_sequences, dtype=np.uint64),
        seq_offsets=offsets,
    )


def write_cache(
    url: str,
    num_tokens: int,
    fmt: str = "arrow",
    seed: int = 0,
    *,
    shard_tokens: int = SHARD_TOKENS,
) -> Manifest:
    """A complete cache of at least `num_tokens` tokens (whole sequences) in shards of
    `shard_tokens`, through the writer."""
    per_shard = max(1, shard_tokens // SEQ)
    sequences = -(-num_tokens // SEQ)
    writer = CacheWriter(url, draft(fmt, sequences * SEQ, shard_tokens), overwrite=True)
    pool = distribution_pool(np.random.default_rng(seed))
    index = 0
    for first in range(0, sequences, per_shard):
        with writer.shard_writer(index) as w:
            w.write(synthetic_records(pool, min(per_shard, sequences - first), seed + index))
            writer.commit_shard(w)
        index += 1
    return writer.finalize(index)


def stream(url: str, *, trace: bool = True) -> dict[str, Any]:
    """One epoch of ShardStream -> batches -> collate: tokens/s, the tracemalloc peaks after a
    quarter of the cache's sequences and at the end (None without `trace`), and the process's
    peak and current RSS before, after a quarter, and at the end."""
    from student_trainer.batch import collate
    from student_trainer.dataset import ShardStream, batches

    cache = open_cache(url)
    total = cache.manifest.num_sequences
    data = ShardStream(url, seed=0, buffer_sequences=BUFFER_SEQUENCES)
    seen = tokens = 0
    early: int | None = None
    rss_start: dict[str, int] = rss()
    rss_quarter: dict[str, int] = {}
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        for group in batches(iter(data), BATCH_TOKENS):
            inputs, _ = collate(group, cache.layout.vocab_size)
            tokens += int(inputs.attention_mask.sum())
            seen += len(group)
            if not rss_quarter and 4 * seen >= total:
                rss_quarter = rss()
                early = tracemalloc.get_traced_memory()[1] if trace else None
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace else None
    finally:
        if trace:
            tracemalloc.stop()
    return {
        "sequences": seen,
        "tokens": tokens,
        "shards": len(cache.shards),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "traced_peak_quarter_bytes": early,
        "traced_peak_end_bytes": peak,
        "rss_start": rss_start,
        "rss_quarter": rss_quarter,
        "rss_end": rss(),
    }


def decoded_shard_bytes(url: str) -> int:
    """The decoded size of a cache's first shard: what one shard costs in memory."""
    return sum(v.nbytes for _, v in open_cache(url).read_shard(0).arrays())


def write_big_manifest(folder: Path, num_shards: int) -> Path:
    """A complete cache folder whose manifest lists `num_shards` shards (copies of one real
    entry, with its fidelity) and which holds none of them: what opening costs, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        one = write_cache(str(Path(tmp) / "one"), SEQ, "arrow").shards[0]
    shards = [
        dataclasses.replace(one, name=shard_name(i, ".arrow"), index=i) for i in range(num_shards)
    ]
    manifest = dataclasses.replace(
        draft("arrow", num_shards * one.num_tokens),
        fidelity=summarize(s.fidelity for s in shards),  # as `CacheWriter.finalize` sets it
    ).with_shards(shards, status="complete")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(to_json(manifest))
    return folder


def open_seconds(url: str, repeat: int = 3) -> float:
    """The fastest of `repeat` `open_cache` calls (parse and checks of the manifest)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        cache = open_cache(url, require_complete=True)
        best = min(best, time.perf_counter() - start)
        assert len(cache.shards) > 0
    return best


def inspect_seconds(url: str) -> float:
    """Wall time of `kdcache inspect URL` in a fresh process."""
    script = Path(sys.executable).with_name("kdcache")
    start = time.perf_counter()
    subprocess.run([str(script), "inspect", url], check=True, capture_output=True)
    return time.perf_counter() - start


def peak_rss_of_stream(url: str) -> dict[str, Any]:
    """`stream` in a fresh process, untraced: the RSS it reports is the loader's alone."""
    code = (
        "import json, sys; from bench.load import stream; "
        "print(json.dumps(stream(sys.argv[1], trace=False)))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code, url],
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss() -> dict[str, int]:
    """This process's peak and current resident set (bytes), from /proc/self/status."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[f"{key.lower()}_bytes"] = int(value.split()[0]) * 1024
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1M tokens and 2,000 shards")
    parser.add_argument("--format", default="arrow", choices=("arrow", "zarr"))
    args = parser.parse_args()
    tokens, shards = (1_000_000, 2_000) if args.quick else (10_000_000, 10_000)
    result: dict[str, Any] = {"machine": platform.platform(), "format": args.format}
    with tempfile.TemporaryDirectory(prefix="kdcache-load-") as tmp:
        url = str(Path(tmp) / "cache")
        start = time.perf_counter()
        manifest = write_cache(url, tokens, args.format)
        write_s = time.perf_counter() - start
        result["cache"] = {
            "tokens": manifest.num_tokens,
            "shards": len(manifest.shards),
            "bytes": manifest.nbytes,
            "write_seconds": write_s,
            "write_tokens_per_s": manifest.num_tokens / write_s,
            "decoded_shard_bytes": decoded_shard_bytes(url),
        }
        result["stream_traced"] = stream(url)
        result["stream_rss"] = peak_rss_of_stream(url)
        big = write_big_manifest(Path(tmp) / "many", shards)
        result["manifest"] = {
            "shards": shards,
            "bytes": (big / "manifest.json").stat().st_size,
            "open_seconds": open_seconds(str(big)),
            "inspect_seconds": inspect_seconds(str(big)),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = (
        f"load{'-quick' if args.quick else ''}{'' if args.format == 'arrow' else '-' + args.format}"
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print("\n".join(report(result)))
    print(f"wrote {RESULTS / (name + '.json')}")


def report(result: dict[str, Any]) -> list[str]:
    """The figures of `main`, as lines."""
    mib = 1 << 20
    c, t, r, m = result["cache"], result["stream_traced"], result["stream_rss"], result["manifest"]
    hwm = [r[f"rss_{when}"]["vmhwm_bytes"] / mib for when in ("start", "quarter", "end")]
    return [
        f"cache      {c['tokens']:,} tokens in {c['shards']} {result['format']} shards, "
        f"{c['bytes'] / mib:.0f} MiB; written at {c['write_tokens_per_s']:,.0f} tokens/s",
        f"stream     {r['tokens_per_s']:,.0f} tokens/s ({t['tokens_per_s']:,.0f} under tracemalloc)",
        f"peak RSS   {hwm[0]:.0f} MiB before the first shard, {hwm[1]:.0f} MiB after a quarter, "
        f"{hwm[2]:.0f} MiB at the end",
        f"traced     peak {t['traced_peak_quarter_bytes'] / mib:.1f} MiB after a quarter, "
        f"{t['traced_peak_end_bytes'] / mib:.1f} MiB at the end "
        f"(one shard decoded: {c['decoded_shard_bytes'] / mib:.1f} MiB)",
        f"manifest   {m['shards']:,} shards, {m['bytes'] / mib:.1f} MiB: open_cache "
        f"{m['open_seconds'] * 1000:.0f} ms, kdcache inspect {m['inspect_seconds']:.2f} s",
    ]


if __name__ == "__main__":
    main()
