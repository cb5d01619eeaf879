"""`make demo`: the whole mission on the embedded default, offline, on a laptop CPU.

1. cache the embedded teacher over the train split of the embedded corpus (Python's own
   documentation) as the quality study recommends within the default cache's bytes (32 draws
   per position, no top-k: `DEMO_TOP_K`, `DEMO_SAMPLES`; BENCHMARKS.md section 4), and its
   top-64 over the held-out validation split;
2. train the small default student from the cache with the recommended loss (`DEMO_LOSS`),
   and the same student with next-token cross-entropy only, same steps and data order;
3. print validation CE before and after, top-1 agreement with the teacher, KL to the teacher's
   top-k, and the cache's bytes per token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cache_builder import BuildConfig, build
from schemas import open_cache
from schemas.stats import teacher_stats
from student_trainer import TrainConfig, train

DEMO_STEPS = 150
"""Optimizer steps per student."""
DEMO_TRAIN_DOCUMENTS = 80
"""Of the 262 documents of the train split (about 130k tokens): the teacher pass is the
demo's largest cost on a CPU."""
DEMO_VALIDATION_DOCUMENTS = 12
"""Of the 31 held-out documents (about 20k tokens)."""
DEMO_LOSS, DEMO_TOP_K, DEMO_SAMPLES = "rskd", 0, 32
"""The frontier's pick within the default top-64 cache's bytes per token: RS-KD on 32 draws
and no top-k, half the bytes (BENCHMARKS.md section 4)."""


def run_demo(out: str | Path, *, steps: int | None = None) -> str:
    out = Path(out)
    start = time.perf_counter()
    caches = {}
    for split, documents in (
        ("train", DEMO_TRAIN_DOCUMENTS),
        ("validation", DEMO_VALIDATION_DOCUMENTS),
    ):
        cfg = BuildConfig(
            out=str(out / f"cache-{split}"),
            split=split,
            max_documents=documents,
            max_length=256,
            top_k=DEMO_TOP_K if split == "train" else 64,
            samples=DEMO_SAMPLES if split == "train" else 0,
            shard_tokens=1 << 16,
            batch_tokens=8192,
        )
        print(build(cfg).summary(), flush=True)
        caches[split] = cfg.out
    runs = {}
    for name, loss in (("kd", DEMO_LOSS), ("ce", "ce")):
        cfg = TrainConfig(
            cache=caches["train"],
            out=str(out / f"student-{name}"),
            loss=loss,
            max_steps=steps or DEMO_STEPS,
            batch_tokens=2048,
            lr=3e-3,
            warmup_steps=20,
            eval_cache=caches["validation"],
            eval_every=max(1, (steps or DEMO_STEPS) // 3),
            eval_tokens=10_000,
            seed=0,
        )
        runs[name] = (train(cfg), _first_eval(Path(cfg.out)))
        print(runs[name][0].summary(), flush=True)
    return _table(runs, caches, time.perf_counter() - start)


def _first_eval(out: Path) -> dict[str, float]:
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval_ce" in row:
            return row
    return {}


def _table(runs: dict, caches: dict[str, str], seconds: float) -> str:
    train_cache, valid_cache = open_cache(caches["train"]), open_cache(caches["validation"])
    m = train_cache.manifest
    teacher = teacher_stats(valid_cache, sample_tokens=40_000, seed=0)
    kd, kd_before = runs["kd"]
    ce, ce_before = runs["ce"]
    rows = [
        ("validation CE, first eval (nats)", kd_before.get("eval_ce"), ce_before.get("eval_ce")),
        ("validation CE, after (nats)", kd.eval["eval_ce"], ce.eval["eval_ce"]),
        ("KL(teacher top-k || student), after", kd.eval["eval_kl_topk"], ce.eval["eval_kl_topk"]),
        (
            "top-1 agreement with the teacher",
            kd.eval["eval_top1_agreement"],
            ce.eval["eval_top1_agreement"],
        ),
    ]
    lines = [
        "",
        f"kdcache demo: {kd.steps} steps per student, {seconds:.0f} s in all",
        f"cache: {m.num_tokens} train tokens, k={m.layout.k} of V={m.layout.vocab_size}"
        + (f" + {m.layout.num_samples} samples" if m.layout.num_samples else "")
        + ", "
        f"{m.nbytes / m.num_tokens:.1f} bytes/token ({m.encoding['ids']} ids, {m.encoding['values']} values, {m.format})",
        f"teacher on validation: CE {teacher['mean_label_nll']:.3f} nats, label in its top-64 {teacher['label_in_topk']:.1%}",
        "",
        f"| {'':38} | {f'distilled ({DEMO_LOSS})':>22} | {'CE only (SFT)':>14} |",
        f"|{'-' * 40}|{'-' * 24}|{'-' * 16}|",
    ]
    for label, a, b in rows:
        lines.append(f"| {label:38} | {_fmt(a):>22} | {_fmt(b):>14} |")
    better = kd.eval["eval_ce"] < ce.eval["eval_ce"]
    lines.append("")
    lines.append(
        "the distilled student reaches a lower validation CE than CE-only training"
        if better
        else "in this run CE-only training reached the lower validation CE"
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
