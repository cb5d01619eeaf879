"""One training step measured: KD from the cache vs cross-entropy vs online KD, and the loader.

    python -m bench.train                 # CPU, a few minutes; writes bench/results/train.{json,md}
    python -m bench.train --quick         # smaller sequences and models, a smoke run
    python -m bench.train --device cuda   # the same on a GPU (bf16 autocast, as `kdcache train`)

Setup. A random Llama teacher (d=512, 8 layers) and a random Llama student (d=256, 4 layers),
both with a 32,000-row output vocabulary (Llama-2's size), and a cache the teacher writes with
`cache_builder.build` over Python's own docs: top-64 plus 32 sampled ids per position, Zarr
shards. The input text goes through the test fixtures' 8,192-token BPE (the most the local corpus
supports), so input ids stay below 8,192 while the logits, the top-k and the samples span all
32,000 ids: what a step costs depends on the output vocabulary. Every case trains on the same
micro-batch of 8 full 512-token sequences (4,096 tokens) with AdamW, and the chunked path uses the
trainer's default `vocab_chunk` of 8,192 (4 chunks). Random weights make the distributions flat,
which changes nothing a step costs.

Cases. The KD steps run exactly the trainer's objective inside `HiddenAndHead`'s forward: the
per-token losses on dense blocks of rows of at most `--logit-block` logits, each block's gradient
taken in the forward (`row_blocked_loss`), and the cached `TeacherBatch`. "kd fkl,
vocabulary-chunked student" is the same loss on `ChunkedStudent` (the path for losses that pool
rows), which recomputes its logits in the backward. "ce (trainer path)" is the registered `ce`
loss on the trainer's path; "ce HF" is the plain Hugging Face forward with `labels=`, which
materialises [tokens, vocab] float32 logits. "online fkl" keeps the teacher in memory, runs it on every batch for full logits, and
takes the dense forward KL over the whole vocabulary against the student's HF logits: what
training without a cache costs (the teacher in float32 on CPU, bfloat16 on CUDA).

Measured. Each case runs in a fresh process: one warm-up step (which also allocates the AdamW
state), then `steps` timed steps; the fastest is reported (the least disturbed on a shared
machine; the median is in the JSON), and tokens/s is the batch's tokens over it. Memory on CPU is the resident set (RSS) from /proc/self/status: the baseline
after the warm-up (weights, optimizer state, batch, and for online KD the teacher), and the
high-water mark (VmHWM, reset through /proc/self/clear_refs before the timed steps) while
stepping; "step MiB" is the difference, the transient memory of a step. glibc's mmap threshold is
pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS. On CUDA it is
torch.cuda.memory_allocated / max_memory_allocated instead. Threads: `--threads` (default 1 on
CPU), so CPU rates are per core. The loader row streams the cache through `ShardStream`,
`batches` and `collate` (decode, checksum, shuffle, pad; no model) on one core.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from student_trainer.config import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
VOCAB_CHUNK = TrainConfig(cache="", out="").vocab_chunk
"""The trainer's default `--vocab-chunk`."""
TOKENIZER_VOCAB = 8192
"""The BPE the local corpus supports; the models' output vocabulary (`vocab`) is larger."""


def sizes(quick: bool) -> dict[str, Any]:
    """Model, batch and cache sizes for a full or a quick run."""
    if quick:
        return dict(
            vocab=16384,
            seq=128,
            batch_seqs=4,
            student=dict(hidden_size=128, num_hidden_layers=2, intermediate_size=344),
            teacher=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688),
            top_k=64,
            samples=32,
            cache_tokens=3000,
            steps=2,
            loader_seconds=2.0,
        )
    return dict(
        vocab=32000,
        seq=512,
        batch_seqs=8,
        student=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688),
        teacher=dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376),
        top_k=64,
        samples=32,
        cache_tokens=12000,
        steps=4,
        loader_seconds=8.0,
    )


CASES: dict[str, str] = {
    "kd fkl (cache)": "fkl",
    "kd bild (cache)": "bild",
    "kd rskd (cache)": "rskd",
    "kd fkl, vocabulary-chunked student": "fkl-chunked",
    "ce (trainer path)": "ce",
    "ce HF logits": "hf-ce",
    "online fkl (teacher co-resident)": "online-fkl",
}
"""Row label -> what the step computes."""


# ----------------------------------------------------------------------------- setup (parent)


def prepare(work: Path, size: dict[str, Any]) -> dict[str, str]:
    """Teacher, student and cache under `work` (reused when present)."""
    from transformers import LlamaConfig
    from transformers.utils import logging as hf_logging

    from cache_builder import BuildConfig, build
    from tests.fixtures.models import EOS, corpus_text, make_tokenizer, save_tiny_model

    hf_logging.disable_progress_bar()
    tokenizer = make_tokenizer(TOKENIZER_VOCAB)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    paths = {name: str(work / name) for name in ("teacher", "student", "cache", "data.jsonl")}
    for name in ("teacher", "student"):
        if not (work / name / "config.json").exists():
            config = LlamaConfig(
                vocab_size=size["vocab"],
                num_attention_heads=max(4, size[name]["hidden_size"] // 64),
                num_key_value_heads=max(2, size[name]["hidden_size"] // 128),
                max_position_embeddings=max(512, size["seq"]),
                tie_word_embeddings=False,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=eos,
                **size[name],
            )
            save_tiny_model(
                work / name, config, seed=1 if name == "teacher" else 2, tokenizer=tokenizer
            )
    data = work / "data.jsonl"
    if not data.exists():
        # Long documents, about 3.5 characters a token, cut to the cache size.
        budget = size["cache_tokens"] * 7 // 2
        with data.open("w") as f:
            for text in sorted(corpus_text(), key=len, reverse=True):
                if budget <= 0:
                    break
                f.write(json.dumps({"text": text[:budget]}) + "\n")
                budget -= len(text)
    build(
        BuildConfig(
            out=paths["cache"],
            teacher=paths["teacher"],
            dataset=str(data),
            max_length=size["seq"],
            top_k=size["top_k"],
            samples=size["samples"],
            shard_tokens=max(size["seq"], size["cache_tokens"] // 4),
            batch_tokens=size["seq"] * 4,
            device="cpu",
            progress=False,
        )
    )
    return paths


# ----------------------------------------------------------------------------- one case (child)


def rss_now() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes, or (ru_maxrss, ru_maxrss) where /proc is missing."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def batch(paths: dict[str, str], size: dict[str, Any]):
    """The micro-batch every case trains on: the first `batch_seqs` full-length sequences."""
    from schemas.cache import open_cache
    from student_trainer.batch import collate
    from student_trainer.dataset import ShardStream

    cache = open_cache(paths["cache"])
    full = [s for s in ShardStream(paths["cache"], shuffle=False) if len(s) == size["seq"]]
    if len(full) < size["batch_seqs"]:
        raise RuntimeError(
            f"the bench cache has {len(full)} full sequences, needs {size['batch_seqs']}"
        )
    return collate(
        full[: size["batch_seqs"]],
        cache.layout.vocab_size,
        cache.layout.temperatures,
        cache.manifest.build.sample_temperature,
        cache.layout.num_samples,
    )


def run_case(kind: str, paths: dict[str, str], size: dict[str, Any], device_name: str) -> dict:
    """Warm up, then time `steps` steps of `kind`; memory as the module docstring says."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from student_trainer.losses import LOSSES
    from student_trainer.losses._student import ChunkedStudent
    from student_trainer.objective import LossSettings, objective_for
    from student_trainer.student import HiddenAndHead

    config = TrainConfig(cache="", out="")

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    inputs, teacher = batch(paths, size)
    inputs, teacher = inputs.to(device), teacher.to(device)
    model = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32).to(device)
    net = HiddenAndHead(model).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    online = None
    if kind == "online-fkl":
        online = AutoModelForCausalLM.from_pretrained(
            paths["teacher"], dtype=torch.bfloat16 if cuda else torch.float32
        ).to(device)
        online.eval()
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)  # HF shifts them

    def loss_of_step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if kind == "hf-ce":
                return model(
                    inputs.input_ids, attention_mask=inputs.attention_mask, labels=labels
                ).loss
            if kind == "online-fkl":
                with torch.no_grad():
                    t = online(inputs.input_ids, attention_mask=inputs.attention_mask).logits
                t = t.reshape(-1, t.shape[-1]).index_select(0, inputs.rows).float()  # (N, V)
                s = model(inputs.input_ids, attention_mask=inputs.attention_mask).logits
                s = s.reshape(-1, s.shape[-1]).index_select(0, inputs.rows).float()  # (N, V)
                return F.kl_div(
                    F.log_softmax(s, -1),
                    F.log_softmax(t, -1),
                    log_target=True,
                    reduction="batchmean",
                )
            if kind == "fkl-chunked":  # the vocabulary-chunked student, for comparison
                h, weight, bias, _ = net(inputs.input_ids, inputs.attention_mask, inputs.rows)
                student = ChunkedStudent(h, weight, bias, vocab_chunk=VOCAB_CHUNK)
                return LOSSES["fkl"].fn(student, teacher)
            # exactly the trainer's objective (row blocks for per-token losses)
            objective = objective_for(
                LOSSES[kind], {}, LossSettings.of(config), teacher, {}, bf16=cuda
            )
            return net(inputs.input_ids, inputs.attention_mask, inputs.rows, objective)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of_step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return float(loss)  # syncs the device

    step()  # warm-up; allocates the AdamW state
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_now()[0]
        resettable = reset_peak()
    times, losses = [], []
    for _ in range(size["steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_now()[1]
    step_s = min(times)  # the least disturbed step: the machine may be shared
    tokens = int(inputs.attention_mask.sum())
    return {
        "kind": kind,
        "step_s": step_s,
        "step_s_median": statistics.median(times),
        "tokens": tokens,
        "tokens_per_s": tokens / step_s,
        "base_mib": base / MIB,
        "peak_mib": peak / MIB,
        "step_mib": (peak - base) / MIB,
        "memory": "cuda allocated" if cuda else ("rss" if resettable else "rss (peak not reset)"),
        "loss": losses[-1],
    }


def run_loader(paths: dict[str, str], size: dict[str, Any]) -> dict:
    """Tokens/s of ShardStream -> batches -> collate on one core, epoch after epoch."""
    from schemas.cache import open_cache
    from student_trainer.batch import collate
    from student_trainer.dataset import ShardStream, batches

    cache = open_cache(paths["cache"])
    layout, sample_t = cache.layout, cache.manifest.build.sample_temperature
    stream = ShardStream(paths["cache"], seed=0, buffer_sequences=64)
    tokens, start, epoch = 0, time.perf_counter(), 0
    batch_tokens = size["seq"] * size["batch_seqs"]
    while time.perf_counter() - start < size["loader_seconds"]:
        stream.epoch = epoch
        for group in batches(iter(stream), batch_tokens):
            inputs, _ = collate(
                group, layout.vocab_size, layout.temperatures, sample_t, layout.num_samples
            )
            tokens += int(inputs.attention_mask.sum())
        epoch += 1
    seconds = time.perf_counter() - start
    return {
        "kind": "loader",
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "epochs": epoch,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    if spec["kind"] == "loader":
        out = run_loader(spec["paths"], spec["size"])
    else:
        out = run_case(spec["kind"], spec["paths"], spec["size"], args.device)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(kind: str, paths: dict, size: dict, device: str, threads: int) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    spec = json.dumps({"kind": kind, "paths": paths, "size": size})
    cmd = [
        sys.executable,
        "-m",
        "bench.train",
        "--device",
        device,
        "--threads",
        str(threads),
        "--child",
        spec,
    ]
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"bench case {kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# ----------------------------------------------------------------------------- report


def table(result: dict) -> str:
    rows = result["cases"]
    ce, hf = rows["ce (trainer path)"], rows["ce HF logits"]
    unit = "GPU MiB (allocated)" if result["device"].startswith("cuda") else "RSS MiB"
    lines = [
        f"Device {result['device']}, {result['threads']} thread(s); batch {result['batch_tokens']} "
        f"tokens (seq {result['size']['seq']}); student {result['student_params_m']:.1f} M params, "
        f"teacher {result['teacher_params_m']:.1f} M; V={result['size']['vocab']}, "
        f"k={result['size']['top_k']}, samples={result['size']['samples']}. Memory: {unit}.",
        "",
        "| step | s/step | tokens/s | base MiB | peak MiB | step MiB | time / CE trainer | "
        "step MiB / CE trainer | time / CE HF | step MiB / CE HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['base_mib']:,.0f} | "
            f"{r['peak_mib']:,.0f} | {r['step_mib']:,.0f} | {r['step_s'] / ce['step_s']:.2f} | "
            f"{r['step_mib'] / max(ce['step_mib'], 1e-9):.2f} | {r['step_s'] / hf['step_s']:.2f} | "
            f"{r['step_mib'] / max(hf['step_mib'], 1e-9):.2f} |"
        )
    loader, kd = result["loader"], rows["kd fkl (cache)"]
    lines += [
        "",
        "| loader (one core, no model) | tokens/s | vs kd fkl step consumption |",
        "|---|---:|---:|",
        f"| ShardStream + batches + collate | {loader['tokens_per_s']:,.0f} | "
        f"{loader['tokens_per_s'] / kd['tokens_per_s']:.1f}x ({kd['tokens_per_s']:,.0f} tokens/s consumed) |",
    ]
    return "\n".join(lines)


def run(quick: bool = False, device: str = "cpu", threads: int | None = None) -> dict:
    """Build the fixtures, measure every case and the loader, print the table, save the JSON."""
    size = sizes(quick)
    threads = threads or (1 if device == "cpu" else os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        start = time.perf_counter()
        paths = prepare(Path(tmp), size)
        print(f"(fixtures in {time.perf_counter() - start:.0f} s)", flush=True)
        cases = {}
        for label, kind in CASES.items():
            cases[label] = spawn(kind, paths, size, device, threads)
            print(
                f"  {label}: {cases[label]['step_s']:.3f} s/step, step {cases[label]['step_mib']:,.0f} MiB",
                flush=True,
            )
        loader = spawn("loader", paths, size, "cpu", 1)
        params = {name: _params(Path(paths[name])) for name in ("student", "teacher")}
    ce, hf = cases["ce (trainer path)"], cases["ce HF logits"]
    result = {
        "device": device,
        "threads": threads,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "size": size,
        "batch_tokens": size["seq"] * size["batch_seqs"],
        "student_params_m": params["student"] / 1e6,
        "teacher_params_m": params["teacher"] / 1e6,
        "cases": cases,
        "loader": loader,
        "ratios": {
            label: {
                "time_vs_ce_trainer": r["step_s"] / ce["step_s"],
                "step_memory_vs_ce_trainer": r["step_mib"] / max(ce["step_mib"], 1e-9),
                "peak_memory_vs_ce_trainer": r["peak_mib"] / ce["peak_mib"],
                "time_vs_ce_hf": r["step_s"] / hf["step_s"],
                "step_memory_vs_ce_hf": r["step_mib"] / max(hf["step_mib"], 1e-9),
                "peak_memory_vs_ce_hf": r["peak_mib"] / hf["peak_mib"],
            }
            for label, r in cases.items()
        },
        "loader_vs_consumption": loader["tokens_per_s"] / cases["kd fkl (cache)"]["tokens_per_s"],
    }
    markdown = table(result)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = (
        "train"
        + ("-quick" if quick else "")
        + ("" if device == "cpu" else "-" + device.split(":")[0])
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    return result


def _params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 on CPU)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    run(quick=args.quick, device=args.device, threads=args.threads)


if __name__ == "__main__":
    main()
