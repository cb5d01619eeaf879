"""Tensor-parallel build (issue 10): `kdcache build --tp 2` under torchrun against the
one-process build, on the CPU: time, memory per rank, the teacher's weights per rank, and
whether the two caches agree.

    python -m bench.tp            # under 2 min on 2 idle cores: bench/results/tp.json
    python -m bench.tp --quick    # a small teacher, for a smoke run: tp-quick.json

Teacher. A random-initialised Llama, untied lm_head, float32: d=512, 8 layers, 8 heads, 4 KV
heads, FFN 1536, V=32,000: 58 M parameters, 221 MiB. Its tokenizer is the test fixtures'
8,192-token BPE (as in bench/build.py): input ids stay below 8,192 while the lm_head, the top-k
and the log-sum-exp span all 32,000 ids. The text is Python's own documentation, cycled to
about 20,000 tokens, in rows of 512 tokens.

Layouts, one after the other, each a fresh set of processes:
- TP=1: `python -m kdcache build --teacher T --dataset D --out OUT1 ...`, one process,
  OMP_NUM_THREADS=1.
- TP=2: `torchrun --standalone --nproc_per_node 2 -m kdcache build --tp 2 ... --out OUT2`,
  OMP_NUM_THREADS=1 per rank: transformers' tensor parallelism over gloo, the lm_head split
  by vocabulary, each rank's top-k over its slice merged; rank 0 writes the shards.
- TP=1, 2 threads: the one-process build again with OMP_NUM_THREADS=2, the cores TP=2 uses.
All run the same options (k=64, 4,096 tokens per forward, 8,192-token shards).

Measured. Each rank runs the real CLI (`kdcache.cli.main`, the same code as `-m kdcache`)
under a thin wrapper (`--rank-record`, below) that, at exit, writes its numbers to a JSON file:
- wall s: the whole command as the parent process times it (torchrun, imports, the data pass,
  loading, checking and hashing the teacher, the build, finalising), and the rate the build
  reports itself (`BuildResult.tokens_per_s`: the same, less the process start and imports);
- peak RSS: the rank's resident-set high-water mark (VmHWM), and its resident set just
  before and just after the teacher loads, the latter split into private memory (RssAnon)
  and mapped files (RssFile: libraries and the safetensors pages transformers maps, which
  ranks on one machine share); glibc's mmap threshold is pinned so freed tensors leave the RSS;
- teacher weight bytes: summed over the parameters of the model `load_teacher` returned in
  that very build, `p.to_local()` for a DTensor (this rank's shard) and `p` for a plain tensor,
  by part (embedding, attention and MLP projections, norms, lm_head).
Agreement: the fingerprint (`Manifest.fingerprint`, which every shard also carries) of both
caches, and shard by shard the tokens, the top-k ids (whole lists equal, the first id equal,
the same set of ids: positions counted), the log-sum-exp and the stored log-probs. The load
average is recorded before and after each layout: on a shared machine other work skews the
times, not the bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.build import _cpu_name, rss

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
TOKENIZER_VOCAB = 8192
TP = 2
LAYOUTS = {"TP=1": (1, 1), f"TP={TP}": (TP, 1), "TP=1, 2 threads": (1, TP)}
"""Label -> (ranks, threads per rank). The last one gives the one-process build the same cores."""

SHAPES: dict[str, dict[str, Any]] = {
    "cpu-quick": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}

RUNS: dict[str, dict[str, Any]] = {
    # max_length, tokens per forward, tokens in all (about), tokens per shard, k
    "cpu-quick": dict(seq=256, batch_tokens=1024, tokens=4096, shard_tokens=2048, k=16),
    "cpu": dict(seq=512, batch_tokens=4096, tokens=20480, shard_tokens=8192, k=64),
}

PARTS = ("embedding", "projections", "norms", "lm_head")
"""How a rank's weight bytes are broken down (`_part` names each parameter's)."""


# ----------------------------------------------------------------------------- setup


def prepare(work: Path, shape: str) -> dict[str, str]:
    """A random teacher (with the fixtures' tokenizer) and a jsonl corpus under `work`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from tests.fixtures.models import EOS, corpus_text, make_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = make_tokenizer(min(TOKENIZER_VOCAB, SHAPES[shape]["vocab_size"]))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    run = RUNS[shape]
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max(4096, run["seq"]),
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher = work / "teacher"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    params = sum(p.numel() for p in model.parameters())
    del model
    # About 4.5 characters a token; the corpus is cycled to the budget.
    data, budget, texts, lap = work / "data.jsonl", run["tokens"] * 9 // 2, corpus_text(), 0
    with data.open("w") as f:
        while budget > 0:
            for text in texts:
                piece = text[:budget] if lap == 0 else f"[{lap}] {text[:budget]}"
                f.write(json.dumps({"text": piece}) + "\n")
                budget -= len(piece)
                if budget <= 0:
                    break
            lap += 1
    return {"teacher": str(teacher), "data": str(data), "params": str(params)}


def build_args(shape: str, paths: dict[str, str], out: Path, tp: int) -> list[str]:
    """`kdcache build ...` as both layouts run it (argv after `kdcache`)."""
    run = RUNS[shape]
    args = ["build", "--teacher", paths["teacher"], "--dataset", paths["data"], "--out", str(out)]
    args += ["--device", "cpu", "--max-length", str(run["seq"]), "--top-k", str(run["k"])]
    args += ["--batch-tokens", str(run["batch_tokens"])]
    args += ["--shard-tokens", str(run["shard_tokens"]), "--overwrite", "--no-progress"]
    return args + (["--tp", str(tp)] if tp > 1 else [])


# ----------------------------------------------------------------------------- one rank (child)


def _part(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norms"
    return "projections"


def held_bytes(model: Any) -> dict[str, int]:
    """Bytes of the teacher's parameters this process holds, by part: a DTensor counts its local
    shard, a plain tensor (replicated, or already cut to this rank) all of itself."""
    held = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held[_part(name)] += local.numel() * local.element_size()
    return held


def memory() -> dict[str, int]:
    """This process's VmRSS, RssAnon (private memory: copies, activations), RssFile (mapped
    files: libraries, and the checkpoint's safetensors pages) and VmHWM, in bytes."""
    try:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
        return {k: int(status[k].split()[0]) * 1024 for k in keys}
    except (OSError, KeyError):  # no /proc (not Linux): what getrusage knows
        now, peak = rss()
        return {"VmRSS": now, "RssAnon": now, "RssFile": 0, "VmHWM": peak}


def rank_child(record: Path, argv: list[str]) -> None:
    """Run `kdcache <argv>` in this process (one rank) and write what it measured to
    `record/rank-<RANK>.json`, also when the command fails."""
    start = time.perf_counter()
    import importlib

    import cache_builder

    # The module, not the `build` function that `cache_builder` re-exports under its name.
    build_module = importlib.import_module("cache_builder.build")
    seen: dict[str, Any] = {"rank": int(os.environ.get("RANK", "0"))}
    load_teacher, build = build_module.load_teacher, cache_builder.build

    def metered_load(*args: Any, **kwargs: Any) -> Any:
        seen["before_load"] = memory()
        teacher = load_teacher(*args, **kwargs)
        seen["after_load"] = memory()
        seen["weight_bytes"] = held_bytes(teacher.model)
        return teacher

    def metered_build(cfg: Any) -> Any:
        result = build(cfg)
        seen.update(build_s=result.seconds, written_tokens=result.written_tokens)
        return result

    build_module.load_teacher = metered_load
    cache_builder.build = metered_build  # the CLI imports it when the command runs
    from kdcache.cli import main as kdcache_main

    try:
        kdcache_main(args=argv, prog_name="kdcache")
    finally:
        seen.update(seconds=time.perf_counter() - start, at_exit=memory())
        record.mkdir(parents=True, exist_ok=True)
        (record / f"rank-{seen['rank']}.json").write_text(json.dumps(seen))


# ----------------------------------------------------------------------------- layouts (parent)


def launch(tp: int, threads: int, shape: str, paths: dict[str, str], work: Path) -> dict[str, Any]:
    """One layout, timed from outside; every rank's record read back."""
    out, record = work / f"cache-tp{tp}-t{threads}", work / f"ranks-tp{tp}-t{threads}"
    wrapped = ["-m", "bench.tp", "--rank-record", str(record), *build_args(shape, paths, out, tp)]
    if tp == 1:
        cmd = [sys.executable, *wrapped]
    else:  # the module behind the `torchrun` command
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(tp), *wrapped]
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }
    root = Path(__file__).resolve().parents[1]
    load_before, start = _load(), time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(
            f"TP={tp} build failed (exit {done.returncode}): {' '.join(cmd)}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    ranks = [json.loads((record / f"rank-{r}.json").read_text()) for r in range(tp)]
    summary = [line for line in done.stdout.splitlines() if line.startswith("built ")]
    return {
        "command": " ".join(["torchrun", *cmd[3:]] if tp > 1 else ["python", *cmd[1:]]),
        "threads_per_rank": threads,
        "load_average_before_after": [load_before, _load()],
        "wall_s": seconds,
        "summary": summary[-1] if summary else "",
        "out": str(out),
        "ranks": ranks,
    }


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def compare(one: str, two: str) -> dict[str, Any]:
    """Whether two caches of the same build agree: fingerprints, then shard by shard."""
    import numpy as np

    from schemas import open_cache

    a, b = open_cache(one, require_complete=True), open_cache(two, require_complete=True)
    out: dict[str, Any] = {
        "fingerprint_tp1": a.manifest.fingerprint,
        "fingerprint_tp2": b.manifest.fingerprint,
        "same_fingerprint": a.manifest.fingerprint == b.manifest.fingerprint,
        "shards": [len(a.shards), len(b.shards)],
    }
    tokens = lists = first = sets = 0
    same_ids, lse, logprob = True, 0.0, 0.0
    for ra, rb in zip(a, b, strict=True):
        same_ids &= bool(np.array_equal(ra.input_ids, rb.input_ids))
        tokens += ra.num_tokens
        lists += int((ra.topk_ids == rb.topk_ids).all(axis=1).sum())
        first += int((ra.topk_ids[:, 0] == rb.topk_ids[:, 0]).sum())
        sets += int((np.sort(ra.topk_ids, 1) == np.sort(rb.topk_ids, 1)).all(axis=1).sum())
        lse = max(lse, float(np.abs(ra.lse - rb.lse).max()))
        logprob = max(logprob, float(np.abs(ra.topk_logprobs - rb.topk_logprobs).max()))
    out.update(
        tokens=tokens,
        same_input_ids=same_ids,
        topk_lists_equal=lists,
        top1_equal=first,
        topk_sets_equal=sets,
        lse_max_abs_diff=lse,
        topk_logprob_max_abs_diff=logprob,
    )
    return out


# ----------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    s, run, agree = result["model"], result["run"], result["agreement"]
    lines = [
        f"{result['device_name']}. Teacher: Llama d={s['hidden_size']}, "
        f"{s['num_hidden_layers']} layers, {s['num_attention_heads']} heads "
        f"({s['num_key_value_heads']} KV), FFN {s['intermediate_size']}, V={s['vocab_size']}, "
        f"{result['params_m']:.1f} M params, float32; {agree['tokens']:,} tokens, rows of "
        f"{run['seq']}, {run['batch_tokens']} per forward, k={run['k']}.",
        "",
        "| layout | threads/rank | rank | wall s | tokens/s (wall) | tokens/s (kdcache's) | "
        "RSS before load MiB | RSS after load MiB (anon + file) | peak RSS MiB | "
        "teacher weights MiB | weights vs TP=1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = sum(result["layouts"]["TP=1"]["ranks"][0]["weight_bytes"].values())
    for label, lay in result["layouts"].items():
        for r in lay["ranks"]:
            held = sum(r["weight_bytes"].values())
            after = r["after_load"]
            lines.append(
                f"| {label} | {lay['threads_per_rank']} | {r['rank']} | {lay['wall_s']:.1f} | "
                f"{agree['tokens'] / lay['wall_s']:,.0f} | "
                f"{r['written_tokens'] / r['build_s']:,.0f} | "
                f"{r['before_load']['VmRSS'] / MIB:,.0f} | {after['VmRSS'] / MIB:,.0f} "
                f"({after['RssAnon'] / MIB:,.0f} + {after['RssFile'] / MIB:,.0f}) | "
                f"{r['at_exit']['VmHWM'] / MIB:,.0f} | {held / MIB:,.1f} | {held / base:.3f} |"
            )
    one = result["layouts"]["TP=1"]["ranks"][0]["weight_bytes"]
    two = result["layouts"][f"TP={TP}"]["ranks"][0]["weight_bytes"]
    loads = [
        f"{label} " + " -> ".join("n/a" if x is None else f"{x:.2f}" for x in load)
        for label, lay in result["layouts"].items()
        for load in [lay["load_average_before_after"]]
    ]
    lines += [
        "",
        "Load average (1 min) before -> after each layout: " + ", ".join(loads) + ".",
        "",
        "Teacher weights by part, MiB (TP=1 | TP=2 rank 0): "
        + ", ".join(f"{p} {one[p] / MIB:,.2f} | {two[p] / MIB:,.2f}" for p in PARTS)
        + ".",
        "",
        f"Agreement (TP=1 vs TP={TP}): fingerprint "
        f"{'equal' if agree['same_fingerprint'] else 'DIFFERENT'} "
        f"({agree['fingerprint_tp1'][:19]}...), shards {agree['shards'][0]} and "
        f"{agree['shards'][1]}, tokens {'equal' if agree['same_input_ids'] else 'DIFFERENT'}; "
        f"of {agree['tokens']:,} positions, {agree['topk_lists_equal']:,} have equal top-k "
        f"lists, {agree['topk_sets_equal']:,} the same set of ids, {agree['top1_equal']:,} the "
        f"same top-1; max |lse diff| "
        f"{agree['lse_max_abs_diff']:.2e}, max |stored log-prob diff| "
        f"{agree['topk_logprob_max_abs_diff']:.2e}.",
    ]
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    """Make the teacher and data, run the layouts, compare, print the table, save the JSON."""
    import torch

    shape = "cpu-quick" if quick else "cpu"
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-tp-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        paths = prepare(work, shape)
        print(f"(teacher and data in {time.perf_counter() - start:.0f} s)", flush=True)
        layouts = {}
        for label, (tp, threads) in LAYOUTS.items():
            layouts[label] = launch(tp, threads, shape, paths, work)
            print(f"  {label}: {layouts[label]['wall_s']:.1f} s", flush=True)
        agreement = compare(layouts["TP=1"]["out"], layouts[f"TP={TP}"]["out"])
    one = sum(layouts["TP=1"]["ranks"][0]["weight_bytes"].values())
    result = {
        "device_name": _cpu_name(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "shape": shape,
        "model": SHAPES[shape],
        "run": RUNS[shape],
        "params_m": int(paths["params"]) / 1e6,
        "layouts": layouts,
        "weight_ratio_tp2_vs_tp1": [
            sum(r["weight_bytes"].values()) / one for r in layouts[f"TP={TP}"]["ranks"]
        ],
        "agreement": agreement,
    }
    markdown = table(result)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "tp-quick" if quick else "tp"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / name}.json")
    return result


def main() -> None:
    if sys.argv[1:2] == ["--rank-record"]:  # one rank of a layout: the rest is kdcache's argv
        rank_child(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small teacher, for a smoke run")
    args = parser.parse_args()
    run(quick=args.quick)


if __name__ == "__main__":
    main()
