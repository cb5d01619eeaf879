"""Stage one measured: the full kdcache build against the bare teacher forward, side by side.

    python -m bench.build                           # CPU, under a minute: bench/results/build.json
    python -m bench.build --quick                   # smaller teacher and data: build-quick.json
    python -m bench.build --device cuda --shape 1b  # the GPU comparison: build-cuda-1b.json
    python -m bench.build --device cuda --shape 8b  # Llama-3.1-8B shape: build-cuda-8b.json

Teachers. Random-initialised Llamas, untied lm_head. On CPU (`--shape cpu`, the default there):
d=256, 4 layers, V=32,000, float32, rows of 512 tokens, one thread. On CUDA: the 1B shape (d=2048,
16 layers, 32 heads, 8 KV heads, FFN 8192) and the 8B shape (d=4096, 32 layers, FFN 14336), both
V=128,256, bfloat16, sdpa attention, rows of 2048 tokens and 16,384 tokens per forward (the
build's default). The text is Python's own documentation (cycled to the token budget) through the
test fixtures' 8,192-token BPE, the most the local corpus supports, so input ids stay below 8,192
while the logits, the top-k and the log-sum-exp span the whole output vocabulary: what a
forward and a top-k cost depends on the output vocabulary, not on which ids come in.

Cases, each in a fresh process, all on exactly the batches the build packs (the build's plan,
per-shard packing, block-diagonal attention through restarting position ids):
- bare forward: `model.base_model` on the packed rows, then the lm_head: [B, L, V] logits in
  the teacher's dtype. The physical floor of any cache build.
- naive top-k + lse: the same, then `torch.topk(logits, k)` and `torch.logsumexp` over the
  logits upcast to float32, the textbook way (as /work/shared/gpu measured it).
- kdcache build: `cache_builder.build` writing a Zarr cache with k=64: the streaming top-k,
  log-sum-exp, tail mass and label log-prob, the copy to the host, encoding, compression,
  checksums and commits. Its rate is over the build loop (first batch to last commit); the
  end-to-end rate also counts the data pass, loading and checking the teacher, and hashing its
  weights.

Measured. Tokens are the real (non-padding) tokens of the batches. Bare and naive run one
warm-up batch, then every batch once. Memory: on CPU the resident set from /proc/self/status,
"base" at the start of the timed loop (weights, batches) and "peak" the high-water mark while it
runs (reset through /proc/self/clear_refs; glibc's mmap threshold is pinned so freed tensors leave
the RSS); on CUDA torch.cuda.memory_allocated and max_memory_allocated.
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

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
TOKENIZER_VOCAB = 8192
K = 64

SHAPES: dict[str, dict[str, Any]] = {
    "cpu-quick": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
    "cpu": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}

RUNS: dict[str, dict[str, Any]] = {
    # max_length, tokens per forward, tokens in all, tokens per shard
    "cpu-quick": dict(seq=256, batch_tokens=1024, tokens=4096, shard_tokens=2048),
    "cpu": dict(seq=512, batch_tokens=2048, tokens=12288, shard_tokens=4096),
    "1b": dict(seq=2048, batch_tokens=16384, tokens=16384 * 40, shard_tokens=1 << 17),
    "8b": dict(seq=2048, batch_tokens=16384, tokens=16384 * 16, shard_tokens=1 << 16),
}

CASES = {
    "bare forward": "bare",
    "forward + naive top-k + fp32 lse": "naive",
    "kdcache build": "build",
}
"""Row label -> case."""


# ----------------------------------------------------------------------------- setup (parent)


def prepare(work: Path, shape: str, device: str) -> dict[str, str]:
    """A random teacher (with the fixtures' tokenizer) and a jsonl corpus under `work`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from tests.fixtures.models import EOS, corpus_text, make_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = make_tokenizer(TOKENIZER_VOCAB)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    run = RUNS[shape]
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher = work / "teacher"
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max(4096, run["seq"]),
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init where it is fast: 8B parameters on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    del model
    if cuda:
        torch.cuda.empty_cache()
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
    return {"teacher": str(teacher), "data": str(data), "cache": str(work / "cache")}


# ----------------------------------------------------------------------------- one case (child)


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, or ru_maxrss twice where /proc is missing."""
    try:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


class Meter:
    """Memory at the start of a timed loop and its peak during it, on CPU or CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss()[0]
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (Linux >= 4.0)
                self.reset = True
            except OSError:
                self.reset = False
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() if self.cuda else rss()[1]
        memory = "cuda allocated" if self.cuda else ("rss" if self.reset else "rss (not reset)")
        return {
            "seconds": seconds,
            "base_mib": self.base / MIB,
            "peak_mib": peak / MIB,
            "memory": memory,
        }


def settings(run: dict[str, Any], paths: dict[str, str], device: str):
    from cache_builder import BuildConfig

    return BuildConfig(
        out=paths["cache"],
        teacher=paths["teacher"],
        dataset=paths["data"],
        device=device,
        max_length=run["seq"],
        top_k=K,
        shard_tokens=run["shard_tokens"],
        batch_tokens=run["batch_tokens"],
        overwrite=True,
        progress=False,
    )


def packed_batches(cfg) -> list:
    """The batches `build(cfg)` sends through the teacher, in its order."""
    from cache_builder.data import load_rows, pack, segments, tokenize_rows
    from cache_builder.plan import make_plan, segments_of
    from cache_builder.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(cfg.teacher)

    def stream():
        rows = load_rows(cfg.dataset, split=cfg.split, text_field=cfg.text_field)
        return segments(tokenize_rows(rows, tokenizer, text_field=cfg.text_field), cfg.max_length)

    plan = make_plan((len(s) for s in stream()), cfg.shard_tokens)
    pad = tokenizer.pad_token_id
    return [
        batch
        for _, segs in segments_of(stream(), list(plan.shards))
        for batch in pack(segs, cfg.max_length, pad_id=pad, batch_tokens=cfg.batch_tokens)
    ]


def run_forward(kind: str, cfg, device: str) -> dict[str, Any]:
    """Bare forward (kind "bare") or forward + torch.topk + fp32 logsumexp ("naive")."""
    import torch

    from cache_builder.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device=device)
    batches = packed_batches(cfg)
    head = teacher.model.get_output_embeddings()

    @torch.inference_mode()
    def step(batch) -> None:
        ids = torch.from_numpy(batch.input_ids).to(teacher.device, non_blocking=True)  # (B, L)
        hidden = teacher.hidden_states(ids, None, batch.seq_lens)  # (B, L, d)
        logits = head(hidden)  # (B, L, V) in the teacher's dtype
        if kind == "naive":
            flat = logits.reshape(-1, logits.shape[-1])  # (B*L, V)
            torch.topk(flat, K, dim=-1)  # (B*L, k) values and ids
            torch.logsumexp(flat.float(), dim=-1)  # (B*L,) over a float32 copy

    step(batches[0])  # warm-up
    meter = Meter(device)
    meter.start()
    for batch in batches:
        step(batch)
    out = meter.stop()
    tokens = sum(b.num_tokens for b in batches)
    return {**out, "tokens": tokens, "tokens_per_s": tokens / out["seconds"]}


def run_build(cfg, device: str) -> dict[str, Any]:
    """`cache_builder.build(cfg)`, its loop timed and metered from inside."""
    import importlib

    # The module, not the `build` function that `cache_builder` re-exports under its name.
    build_module = importlib.import_module("cache_builder.build")
    meter, loop = Meter(device), {}
    inner = build_module._run

    def timed_run(*args: Any, **kwargs: Any) -> int:
        meter.start()  # the teacher is loaded, the plan made: the loop starts here
        done = inner(*args, **kwargs)
        loop.update(meter.stop())
        return done

    build_module._run = timed_run
    start = time.perf_counter()
    result = build_module.build(cfg)
    seconds = time.perf_counter() - start
    return {
        **loop,
        "tokens": result.tokens,
        "tokens_per_s": result.written_tokens / loop["seconds"],
        "end_to_end_s": seconds,
        "end_to_end_tokens_per_s": result.written_tokens / seconds,
        "shards": result.shards,
        "bytes_per_token": result.nbytes / result.tokens,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    cfg = settings(RUNS[spec["shape"]], spec["paths"], args.device)
    if spec["kind"] == "build":
        out = run_build(cfg, args.device)
    else:
        out = run_forward(spec["kind"], cfg, args.device)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(kind: str, shape: str, paths: dict[str, str], device: str, threads: int) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }
    spec = json.dumps({"kind": kind, "shape": shape, "paths": paths})
    cmd = [sys.executable, "-m", "bench.build", "--device", device, "--threads", str(threads)]
    cmd += ["--child", spec]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"bench case {kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# ----------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    rows, shape = result["cases"], result["shape"]
    bare = rows["bare forward"]
    built = rows["kdcache build"]
    unit = "GPU MiB (allocated)" if result["device"].startswith("cuda") else "RSS MiB"
    s = SHAPES[shape]
    lines = [
        f"Device {result['device']} ({result['device_name']}), {result['threads']} thread(s); "
        f"teacher shape {shape}: d={s['hidden_size']}, {s['num_hidden_layers']} layers, "
        f"V={s['vocab_size']}, {result['params_m']:,.1f} M params, {result['dtype']}; rows of "
        f"{result['run']['seq']} tokens, {result['run']['batch_tokens']} per forward, "
        f"{bare['tokens']:,} tokens; k={K}. Memory: {unit}.",
        "",
        "| case | tokens/s | vs bare forward | loop s | base MiB | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / bare['tokens_per_s']:.2f} | "
            f"{r['seconds']:.2f} | {r['base_mib']:,.0f} | {r['peak_mib']:,.0f} |"
        )
    lines += [
        "",
        f"kdcache build end to end (data pass, teacher load and check, weight hashing included): "
        f"{built['end_to_end_tokens_per_s']:,.0f} tokens/s over {built['end_to_end_s']:.1f} s; "
        f"{built['shards']} shards, {built['bytes_per_token']:.1f} bytes/token.",
    ]
    return "\n".join(lines)


def run(
    quick: bool = False, device: str = "cpu", shape: str | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Make the teacher and data, measure the three cases, print the table, save the JSON."""
    import torch

    cuda = device.startswith("cuda")
    if shape is None:
        shape = ("1b" if cuda else "cpu") + ("" if cuda or not quick else "-quick")
    if cuda and shape not in ("1b", "8b"):
        raise SystemExit("--device cuda takes --shape 1b or 8b")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    threads = threads or (1 if not cuda else os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-build-") as tmp:
        start = time.perf_counter()
        paths = prepare(Path(tmp), shape, device)
        print(f"(teacher and data in {time.perf_counter() - start:.0f} s)", flush=True)
        cases = {}
        for label, kind in CASES.items():
            cases[label] = spawn(kind, shape, paths, device, threads)
            print(f"  {label}: {cases[label]['tokens_per_s']:,.0f} tokens/s", flush=True)
        params = _params(Path(paths["teacher"]))
    bare = cases["bare forward"]["tokens_per_s"]
    result = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "threads": threads,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "shape": shape,
        "model": SHAPES[shape],
        "run": RUNS[shape],
        "dtype": "bfloat16" if cuda else "float32",
        "params_m": params / 1e6,
        "k": K,
        "cases": cases,
        "ratios": {
            "build_vs_bare": cases["kdcache build"]["tokens_per_s"] / bare,
            "naive_vs_bare": cases["forward + naive top-k + fp32 lse"]["tokens_per_s"] / bare,
            "build_vs_naive": cases["kdcache build"]["tokens_per_s"]
            / cases["forward + naive top-k + fp32 lse"]["tokens_per_s"],
        },
    }
    markdown = table(result)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "build" + ("-quick" if quick and not cuda else "") + (f"-cuda-{shape}" if cuda else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / name}.json")
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:  # no /proc (not Linux): fall back to what platform knows
        return platform.processor() or platform.machine()
    return platform.processor() or platform.machine()


def _params(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller teacher and data (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="teacher shape (default: cpu, or 1b on cuda)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 on CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    run(quick=args.quick, device=args.device, shape=args.shape, threads=args.threads)


if __name__ == "__main__":
    main()
