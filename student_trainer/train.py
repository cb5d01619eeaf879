"""`train(cfg)`: stream a cache into student training.

cache shards -> ShardStream -> batches -> collate -> student hidden states (N, d)
-> loss(student logits, TeacherBatch) [+ CE, z-loss] -> AdamW step

Per-token losses see dense logits of blocks of rows (`row_blocked_loss`), the others the
vocabulary-chunked `ChunkedStudent`; neither holds [N, V] logits.

The loss is computed inside the student's forward (`HiddenAndHead` with an objective), the
module that DDP or FSDP wraps (`parallel.py`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from schemas.cache import Cache, open_cache
from schemas.errors import ConfigError, IncompatibleCacheError
from student_trainer.batch import StudentInputs, TeacherBatch, collate
from student_trainer.config import TrainConfig
from student_trainer.dataset import ShardStream, batches
from student_trainer.losses import LOSSES, LossSpec, resolve_options
from student_trainer.losses._student import ChunkedStudent
from student_trainer.losses.kl import fkl_tail
from student_trainer.losses.zloss import cross_entropy
from student_trainer.metrics import MetricLog
from student_trainer.objective import objective_for
from student_trainer.parallel import (
    clip_grad_norm,
    fsdp_units,
    full_state,
    load_full_state,
    student_weights,
)
from student_trainer.parallel import wrap as wrap_for_ranks
from student_trainer.student import HiddenAndHead, load_student

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    out: str
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    eval: dict[str, float] = field(default_factory=dict)
    bad_shards: list[str] = field(default_factory=list)
    approximations: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        line = f"trained {self.steps} steps on {self.tokens} tokens in {self.seconds:.1f} s; final loss {self.final_loss:.4f}"
        if self.eval:
            line += "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval.items())
        if self.bad_shards:
            names = ", ".join(self.bad_shards[:5]) + (", ..." if len(self.bad_shards) > 5 else "")
            line += f"; skipped {len(self.bad_shards)} bad shards ({names})"
        return line


def train(cfg: TrainConfig) -> TrainResult:
    spec = _loss_spec(cfg.loss)
    options = resolve_options(cfg.loss, cfg.loss_options)
    _check_one_ce(spec, options, cfg)
    rank, world, local = _ranks()
    device = torch.device(
        cfg.device
        if cfg.device != "auto"
        else (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    )
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    say = _say if rank == 0 else (lambda message: None)

    cache = open_cache(cfg.cache, require_complete=True, **cfg.storage_options)
    _check_cache_fits(spec, cfg, cache)
    if len(cache.shards) < world:  # a rank without shards would leave the others waiting
        raise IncompatibleCacheError(
            f"{cache.url} has {len(cache.shards)} shards for {world} ranks; each rank reads whole shards",
            hint="rebuild the cache with a smaller --shard-tokens, or train on fewer ranks",
        )
    model, tokenizer, what = load_student(cfg, cache)
    say(
        f"{what}; loss {cfg.loss} {options or ''}; cache {cache.url} ({cache.manifest.num_tokens} tokens, k={cache.layout.k})"
    )
    net = HiddenAndHead(model, aux_head=spec.aux_head)
    if cfg.fsdp and world == 1:
        say("--fsdp: one process, nothing to shard; training unsharded (launch with torchrun)")
    wrapped = wrap_for_ranks(net, device, world, fsdp=cfg.fsdp)
    if units := fsdp_units(net):
        say(f"FSDP over {world} ranks in {units} units: each decoder layer, then the rest")

    stream = ShardStream(
        cfg.cache,
        seed=cfg.seed,
        buffer_sequences=cfg.shuffle_buffer,
        rank=rank,
        world_size=world,
        skip_bad_shards=cfg.skip_bad_shards,
        storage_options=cfg.storage_options,
    )
    steps_per_epoch = max(
        1, math.ceil(cache.manifest.num_tokens / (cfg.batch_tokens * cfg.grad_accum * world))
    )
    total_steps = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(cfg.warmup_steps, total_steps)
    )

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "micro": 0, "epoch": 0, "tokens": 0}
    if cfg.resume:
        state = _load_checkpoint(out, net, optimizer, schedule)
        say(f"resumed from step {state['step']}")
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))

    log = MetricLog(out, enabled=rank == 0)
    micro_batches = _micro_batches(stream, cfg, cache, state)
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        unit="step",
        desc="train",
        disable=not cfg.progress or rank != 0,
        dynamic_ncols=True,
    )
    approx: dict[str, list[float]] = {}
    start, last_loss = time.perf_counter(), float("nan")
    start_tokens = state["tokens"]
    if cfg.eval_cache and not cfg.resume:  # the "before" point of every eval curve
        log.write({"step": 0, **evaluate(net, cfg, device, bf16)})
    net.train()
    while state["step"] < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            inputs, teacher = next(micro_batches)
            inputs, teacher = inputs.to(device), teacher.to(device)
            stats: dict[str, torch.Tensor] = {}
            objective = objective_for(spec, options, cfg, teacher, stats, bf16)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = wrapped(inputs.input_ids, inputs.attention_mask, inputs.rows, objective)
            loss = loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())  # deliberate sync, once per micro-batch, for the log
            state["tokens"] += int(inputs.attention_mask.sum()) * world
            state["micro"] += 1
            for key, value in stats.items():
                approx.setdefault(key, []).append(float(value))
        if world > 1:  # log the loss of the whole step, not of this rank's share of it
            step_loss = _mean_over_ranks(step_loss, device, world)
        # --clip 0 clips nothing but still measures the norm for the log
        grad_norm = clip_grad_norm(net.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        state["step"] += 1
        last_loss = step_loss
        elapsed = time.perf_counter() - start
        tok_s = (state["tokens"] - start_tokens) / elapsed if elapsed else 0.0
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        row = {
            "step": state["step"],
            "loss": step_loss,
            "grad_norm": float(grad_norm),  # deliberate sync, once per step
            "lr": schedule.get_last_lr()[0],
            "tokens": state["tokens"],
            "tokens_per_s": tok_s,
        }
        if cfg.eval_cache and cfg.eval_every and state["step"] % cfg.eval_every == 0:
            row.update(evaluate(net, cfg, device, bf16))
        if state["step"] % cfg.log_every == 0 or state["step"] == total_steps or "eval_ce" in row:
            log.write(row)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            _save_checkpoint(out, net, optimizer, schedule, state)  # every rank: FSDP gathers
    bar.close()

    result = TrainResult(
        cfg.out,
        state["step"],
        state["tokens"],
        time.perf_counter() - start,
        last_loss,
        bad_shards=list(stream.bad_shards),
    )
    result.approximations = {k: float(np.mean(v)) for k, v in approx.items()}
    if cfg.eval_cache:
        result.eval = evaluate(net, cfg, device, bf16)
        log.write({"step": state["step"], **result.eval})
    _save_checkpoint(out, net, optimizer, schedule, state)
    weights = student_weights(net) if cfg.save_model else None  # every rank: FSDP gathers
    if rank == 0:
        if cfg.save_model:
            # Under FSDP `model`'s own parameters are shards; `weights` are the whole tensors.
            model.save_pretrained(out / "student", state_dict=weights)
            tokenizer.save_pretrained(out / "student")
        log.plot(out / "loss_curve.png")
        log.close()
        (out / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)  # deliberate sync, once per step
    return float(total) / world


def _micro_batches(
    stream: ShardStream, cfg: TrainConfig, cache: Cache, state: dict[str, int]
) -> Iterator[tuple[StudentInputs, TeacherBatch]]:
    """Endless micro-batches, epoch after epoch; resumes at `state["micro"]` by replaying the
    deterministic stream (exact, at the cost of re-reading what was already consumed)."""
    layout = cache.layout
    skip = state["micro"]
    for epoch in itertools.count(state.get("epoch", 0) if not skip else 0):
        stream.epoch = epoch
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False
        )
        produced = False
        for group in batches(iter(loader), cfg.batch_tokens):
            produced = True
            if skip:
                skip -= 1
                continue
            state["epoch"] = epoch
            yield collate(
                group,
                layout.vocab_size,
                layout.temperatures,
                cache.manifest.build.sample_temperature,
            )
        if not produced:
            raise IncompatibleCacheError(
                f"{cache.url} yields no training sequences (all shorter than 2 tokens or skipped)"
            )


@torch.no_grad()
def evaluate(
    net: HiddenAndHead, cfg: TrainConfig, device: torch.device, bf16: bool
) -> dict[str, float]:
    """Student CE, bucketed KL to the teacher's top-k (exact lower bound on the full KL) and
    top-1 agreement with the teacher, on up to `eval_tokens` held-out tokens.

    Every rank evaluates the same batches: under FSDP each forward is a collective."""
    assert cfg.eval_cache is not None
    cache = open_cache(cfg.eval_cache, require_complete=True, **cfg.storage_options)
    stream = ShardStream(cfg.eval_cache, shuffle=False, storage_options=cfg.storage_options)
    was_training = net.training
    net.eval()
    totals = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    for group in batches(iter(stream), cfg.batch_tokens):
        inputs, teacher = collate(group, cache.layout.vocab_size)
        inputs, teacher = inputs.to(device), teacher.to(device)

        def measures(h, weight, bias, aux, teacher=teacher):
            student = ChunkedStudent(h, weight, bias, vocab_chunk=cfg.vocab_chunk)
            agree = (student.topk_ids(1)[:, 0] == teacher.ids[:, 0]).float().sum()
            return cross_entropy(student, teacher.labels), fkl_tail(student, teacher), agree

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ce, kl, agree = net(inputs.input_ids, inputs.attention_mask, inputs.rows, measures)
        n = teacher.labels.shape[0]
        totals["ce"] += float(ce) * n
        totals["kl"] += float(kl) * n
        totals["agree"] += float(agree)
        totals["n"] += n
        if totals["n"] >= cfg.eval_tokens:
            break
    net.train(was_training)
    n = max(totals["n"], 1)
    return {
        "eval_ce": totals["ce"] / n,
        "eval_kl_topk": totals["kl"] / n,
        "eval_top1_agreement": totals["agree"] / n,
    }


def _loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def _check_one_ce(spec: LossSpec, options: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse --ce-weight on a loss that already adds its paper's cross-entropy term."""
    if cfg.ce_weight and spec.builtin_ce(options):
        raise ConfigError(
            f"loss {cfg.loss} already adds the next-token cross-entropy "
            f"({spec.ce_option}={spec.builtin_ce(options):g}), so --ce-weight would count it twice",
            hint=f"drop --ce-weight, or set its weight with --loss-option {spec.ce_option}=...",
        )


def _check_cache_fits(spec: LossSpec, cfg: TrainConfig, cache: Cache) -> None:
    if spec.needs_samples and cache.layout.num_samples == 0:
        raise IncompatibleCacheError(
            f"loss {cfg.loss} needs sampled tokens, but {cache.url} was built without them",
            hint="rebuild the cache with `kdcache build --samples 50` (or another N)",
        )


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _ranks() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _save_checkpoint(
    out: Path, net: HiddenAndHead, optimizer, schedule, state: dict[str, int]
) -> None:
    """Every rank calls this (under FSDP gathering the full state is a collective); rank 0
    writes. The checkpoint holds full tensors keyed by name, whatever the parallelism."""
    model_state, optimizer_state = full_state(net, optimizer)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    payload = {
        "model": model_state,
        "optimizer": optimizer_state,
        "schedule": schedule.state_dict(),
        "state": dict(state),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / CHECKPOINT)  # a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(out: Path, net: HiddenAndHead, optimizer, schedule) -> dict[str, int]:
    """Every rank reads the checkpoint (--out is shared by the ranks) and keeps its shard."""
    path = out / CHECKPOINT
    if not path.exists():
        raise ConfigError(
            f"--resume: no checkpoint at {path}", hint="run without --resume to start fresh"
        )
    payload = torch.load(path, weights_only=False)
    load_full_state(net, optimizer, payload["model"], payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    torch.set_rng_state(payload["rng"]["torch"])
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    return dict(payload["state"])


def _say(message: str) -> None:
    print(f"kdcache: {message}", file=sys.stderr, flush=True)
