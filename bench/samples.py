"""Sample storage measured: bytes per token of `--samples 32` with and without a top-k.

    python -m bench.samples            # ~3 minutes on 2 cores; writes bench/results/samples.*
    python -m bench.samples --documents 8   # a smoke run

Three real builds of the embedded teacher over the same documents, same seed: top-64 alone (the
default cache), top-64 with 32 samples, and 32 samples alone (`--top-k 0`). The last two draw
the same tokens (the draws do not depend on k), so the samples-only cache lists every draw of
the other one, which keeps only those outside its top-64: the bench checks that.

For comparison, the same draws stored the format 2.x way (every draw, ids ascending, float32
log-probs) are written as Zarr arrays exactly as `schemas._zarr` writes a column, and the RS-KD
paper's reference is quoted: about 12 distinct ids for about 50 draws, ~36 B/token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import zarr

from cache_builder import BuildConfig, build
from schemas import _zarr, open_cache

RESULTS = Path(__file__).resolve().parent / "results"
RSKD_REFERENCE = {"unique_ids": 12, "draws": 50, "bytes_per_token": 36}
"""RS-KD (arXiv 2503.16870): its sparse storage of ~50 draws per token."""
SAMPLE_COLUMNS = ("sample_ids", "sample_counts", "sample_logprob")


def _column_bytes(cache_dir: Path) -> dict[str, int]:
    """Bytes on disk per stored column, summed over the cache's shards."""
    out: dict[str, int] = {}
    for shard in (cache_dir / "shards").iterdir():
        for column in shard.iterdir():
            if column.is_dir():
                size = sum(f.stat().st_size for f in column.rglob("*") if f.is_file())
                out[column.name] = out.get(column.name, 0) + size
    return out


def _v2_sample_bytes(only: Path) -> int:
    """The samples-only cache's draws written as a 2.x cache stores them: distinct ids
    ascending, padding repeating the first id, float32 log-probs, Zarr as the backend does."""
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, records in enumerate(open_cache(str(only))):
            used = records.sample_counts > 0
            key = np.where(used, records.sample_ids, np.iinfo(np.int32).max)
            order = np.argsort(key, axis=1, kind="stable")
            ids, counts, lp = (
                np.take_along_axis(a, order, 1)
                for a in (records.sample_ids, records.sample_counts, records.sample_logprobs)
            )
            pad = counts == 0
            ids = np.where(pad, ids[:, :1], ids).astype(np.uint16)
            lp = np.where(pad, lp[:, :1], lp).astype(np.float32)
            group = zarr.open_group(f"{tmp}/{i}.zarr", mode="w", zarr_format=3)
            for name, values, shuffle in (
                ("sample_ids", ids, "bitshuffle"),
                ("sample_counts", counts, "bitshuffle"),
                ("sample_logprobs", lp, "shuffle"),
            ):
                _zarr._array(group, name, values, shuffle)
            total += sum(f.stat().st_size for f in Path(tmp, f"{i}.zarr").rglob("*") if f.is_file())
    return total


def run(documents: int = 31, out: str | Path = "runs/samples") -> dict:
    out = Path(out)
    common = dict(split="validation", max_documents=documents, max_length=256, progress=False)
    configs = {
        "top-64": BuildConfig(out=str(out / "k64"), top_k=64, **common),
        "top-64 + 32 samples": BuildConfig(
            out=str(out / "k64-s32"), top_k=64, samples=32, **common
        ),
        "32 samples, no top-k": BuildConfig(out=str(out / "k0-s32"), top_k=0, samples=32, **common),
    }
    for cfg in configs.values():
        build(cfg)
    caches = {name: open_cache(cfg.out) for name, cfg in configs.items()}
    tokens = caches["top-64"].manifest.num_tokens
    both, only = caches["top-64 + 32 samples"], caches["32 samples, no top-k"]
    unique = listed = listed_draws = 0
    for a, b in zip(both, only, strict=True):  # the same draws: b lists all, a those outside
        unique += int((b.sample_counts > 0).sum())
        listed += int((a.sample_counts > 0).sum())
        listed_draws += int(a.sample_counts.sum())
        inside = (b.sample_ids[:, :, None] == a.topk_ids[:, None, :]).any(-1)
        outside_b = np.where(inside, 0, b.sample_counts).sum(1)
        if not np.array_equal(outside_b, a.sample_counts.sum(1)):
            raise AssertionError("the two sampled builds did not draw the same tokens")
    rows = {}
    for name, cache in caches.items():
        columns = _column_bytes(Path(configs[name].out))
        samples = sum(v for k, v in columns.items() if k.startswith(SAMPLE_COLUMNS))
        rows[name] = {
            "bytes_per_token": cache.manifest.nbytes / tokens,
            "sample_bytes_per_token": samples / tokens,
        }
    v2 = _v2_sample_bytes(Path(configs["32 samples, no top-k"].out)) / tokens
    rows["top-64 + 32 samples, stored as format 2.x"] = {
        "bytes_per_token": rows["top-64"]["bytes_per_token"] + v2,
        "sample_bytes_per_token": v2,
    }
    report = {
        "tokens": tokens,
        "documents": documents,
        "draws_per_position": 32,
        "mean_distinct_ids": unique / tokens,
        "mean_distinct_ids_outside_top64": listed / tokens,
        "mean_draws_outside_top64": listed_draws / tokens,
        "caches": rows,
        "rskd_paper_reference": RSKD_REFERENCE,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "samples.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "samples.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Embedded teacher, {report['tokens']} held-out tokens, 32 draws per position: "
        f"{report['mean_distinct_ids']:.1f} distinct ids per position, "
        f"{report['mean_distinct_ids_outside_top64']:.1f} of them outside the top-64 "
        f"({report['mean_draws_outside_top64']:.1f} of the 32 draws).",
        "",
        "| cache | bytes/token | of which samples |",
        "|---|---|---|",
    ]
    for name, row in report["caches"].items():
        lines.append(
            f"| {name} | {row['bytes_per_token']:.1f} | {row['sample_bytes_per_token']:.1f} |"
        )
    ref = report["rskd_paper_reference"]
    lines += [
        f"| RS-KD paper's reference (~{ref['unique_ids']} ids for ~{ref['draws']} draws) | - | "
        f"~{ref['bytes_per_token']} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=31, help="held-out documents cached")
    parser.add_argument("--out", default="runs/samples")
    args = parser.parse_args(argv)
    print(markdown(run(args.documents, args.out)))


if __name__ == "__main__":
    main()
