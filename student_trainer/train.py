"""`train(cfg)`: stream a cache into student training.

cache shards -> cache_dataset -> batches -> KDCollator -> student hidden states (N, d)
-> loss(student logits, TeacherBatch) [+ CE, z-loss] -> AdamW step

The data path and the loss are the public API's (`student_trainer.api`): a team distilling in
its own trainer runs the code this loop runs.

Per-token losses see dense logits of blocks of rows (`row_blocked_loss`), the others the
vocabulary-chunked `ChunkedStudent`; neither holds [N, V] logits.

The loss is computed inside the student's forward (`HiddenAndHead` with an objective), the
module that DDP or FSDP wraps (`parallel.py`).

Before any of that, the caches' manifests are checked as `kdcache validate` checks them, and a
`--resume` is compared with its checkpoint (`checkpoint.py`): a resumed run writes what an
uninterrupted one would have, or refuses to start.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from schemas.cache import Cache, open_cache
from schemas.errors import ConfigError, IncompatibleCacheError
from schemas.validate import check_manifest
from student_trainer.api import KDCollator, cache_dataset
from student_trainer.batch import StudentInputs, TeacherBatch
from student_trainer.checkpoint import (
    CHECKPOINT,
    Progress,
    check_resume,
    read_checkpoint,
    remove_temporary,
    restore,
    save_checkpoint,
)
from student_trainer.config import TrainConfig, trained_settings
from student_trainer.dataset import ShardStream, batches, note_skipped
from student_trainer.losses import LOSSES, LossSpec, resolve_options
from student_trainer.losses._student import ChunkedStudent
from student_trainer.losses.kl import fkl_tail
from student_trainer.losses.zloss import cross_entropy
from student_trainer.metrics import RESULT, MetricLog, TrainResult
from student_trainer.objective import LossSettings, objective_for
from student_trainer.parallel import clip_grad_norm, fsdp_units, student_weights
from student_trainer.parallel import wrap as wrap_for_ranks
from student_trainer.student import HiddenAndHead, load_student

__all__ = ["CHECKPOINT", "TrainResult", "evaluate", "train"]


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
    # The config as the run uses it: what train_config.json and every checkpoint record.
    cfg = dataclasses.replace(cfg, loss_options=options, bf16=bf16, device=str(device))
    say = _say if rank == 0 else (lambda message: None)

    cache = open_cache(cfg.cache, require_complete=True, **cfg.storage_options)
    check_manifest(cache, "--cache")
    eval_cache = None
    if cfg.eval_cache is not None:
        eval_cache = open_cache(cfg.eval_cache, require_complete=True, **cfg.storage_options)
        check_manifest(eval_cache, "--eval-cache")
        if eval_cache.layout.k == 0:
            raise IncompatibleCacheError(
                f"--eval-cache {cfg.eval_cache} stores samples only (built with --top-k 0), and "
                "evaluation scores the student against the teacher's top-k",
                hint="build the held-out cache with --top-k 1 or more",
            )
    _check_cache_fits(spec, cfg, cache)
    _check_temperature(spec, options, cfg, cache, say)
    if len(cache.shards) < world:  # a rank without shards would leave the others waiting
        raise IncompatibleCacheError(
            f"{cache.url} has {len(cache.shards)} shards for {world} ranks; each rank reads whole shards",
            hint="rebuild the cache with a smaller --shard-tokens, or train on fewer ranks",
        )
    out = Path(cfg.out)
    settings = trained_settings(
        cfg,
        cache=cache.manifest.fingerprint,
        eval_cache=eval_cache.manifest.fingerprint if eval_cache else None,
        world=world,
    )
    saved = read_checkpoint(out) if cfg.resume else None
    if saved is not None and not check_resume(saved, out, settings, cfg.to_json()):
        say("the checkpoint predates the settings check: this command's settings are not compared")
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

    stream = cache_dataset(
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

    loss_settings = LossSettings.of(cfg)
    progress = Progress()
    if saved is not None:
        progress = restore(saved, net, optimizer, schedule)
        saved = None  # its tensors are loaded: free the copy
        say(f"resumed from step {progress.step}")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        remove_temporary(out)
        if not cfg.resume:  # a fresh run owns --out: nothing of an earlier run stays to resume
            for name in (CHECKPOINT, RESULT):
                (out / name).unlink(missing_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    log = MetricLog(out, enabled=rank == 0, resumed=progress if cfg.resume else None)

    def checkpoint() -> None:
        _note_bad_shards(progress, stream)
        progress.metrics_bytes = log.size()
        save_checkpoint(
            out, net, optimizer, schedule, progress, config=cfg.to_json(), settings=settings
        )  # every rank: FSDP gathers

    micro_batches = _micro_batches(stream, cfg, cache, progress)
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        unit="step",
        desc="train",
        disable=not cfg.progress or rank != 0,
        dynamic_ncols=True,
    )
    start, start_tokens, seconds_before = time.perf_counter(), progress.tokens, progress.seconds
    if eval_cache is not None and not cfg.resume:  # the "before" point of every eval curve
        log.write({"step": 0, **evaluate(net, cfg, device, bf16)})
    net.train()
    while progress.step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            inputs, teacher = next(micro_batches)
            inputs, teacher = inputs.to(device), teacher.to(device)
            stats: dict[str, torch.Tensor] = {}
            now = loss_settings
            if spec.scheduled:  # the loss weighs its terms by how far training has come
                now = dataclasses.replace(now, epoch=progress.tokens / cache.manifest.num_tokens)
            objective = objective_for(spec, options, now, teacher, stats, bf16)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = wrapped(inputs.input_ids, inputs.attention_mask, inputs.rows, objective)
            loss = loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())  # deliberate sync, once per micro-batch, for the log
            progress.tokens += int(inputs.attention_mask.sum()) * world
            progress.micro += 1
            for key, value in stats.items():
                progress.add_approximation(key, float(value))
        if world > 1:  # log the loss of the whole step, not of this rank's share of it
            step_loss = _mean_over_ranks(step_loss, device, world)
        # --clip 0 clips nothing but still measures the norm for the log
        grad_norm = clip_grad_norm(net.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        progress.step += 1
        progress.last_loss, progress.final_eval = step_loss, None
        elapsed = time.perf_counter() - start
        progress.seconds = seconds_before + elapsed
        tok_s = (progress.tokens - start_tokens) / elapsed if elapsed else 0.0
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        row = {
            "step": progress.step,
            "loss": step_loss,
            "grad_norm": float(grad_norm),  # deliberate sync, once per step
            "lr": schedule.get_last_lr()[0],
            "tokens": progress.tokens,
            "tokens_per_s": tok_s,
        }
        if eval_cache is not None and cfg.eval_every and progress.step % cfg.eval_every == 0:
            row.update(evaluate(net, cfg, device, bf16))
        if progress.step % cfg.log_every == 0 or progress.step == total_steps or "eval_ce" in row:
            log.write(row)
        if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()

    # A finished run resumed has evaluated already: it reports that evaluation, logged once.
    if eval_cache is not None and progress.final_eval is None:
        progress.final_eval = evaluate(net, cfg, device, bf16)
        log.write({"step": progress.step, **progress.final_eval})
    checkpoint()
    result = TrainResult(
        cfg.out,
        progress.step,
        progress.tokens,
        progress.seconds,
        progress.last_loss,
        eval=dict(progress.final_eval or {}),
        bad_shards=list(progress.bad_shards),
        approximations=progress.approximations(),
    )
    weights = student_weights(net) if cfg.save_model else None  # every rank: FSDP gathers
    if rank == 0:
        if cfg.save_model:
            # Under FSDP `model`'s own parameters are shards; `weights` are the whole tensors.
            model.save_pretrained(out / "student", state_dict=weights)
            tokenizer.save_pretrained(out / "student")
        log.plot(out / "loss_curve.png")
        log.close()
        result.write(out / RESULT)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _note_bad_shards(progress: Progress, stream: ShardStream) -> None:
    """Add the shards this process skipped to the run's list (a resume replays past them)."""
    progress.bad_shards += [s for s in stream.bad_shards if s not in progress.bad_shards]


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)  # deliberate sync, once per step
    return float(total) / world


def _micro_batches(
    stream: ShardStream, cfg: TrainConfig, cache: Cache, progress: Progress
) -> Iterator[tuple[StudentInputs, TeacherBatch]]:
    """Endless micro-batches, epoch after epoch; resumes at `progress.micro` by replaying the
    deterministic stream (exact, at the cost of re-reading what was already consumed)."""
    collator = KDCollator(cache)
    skip = progress.micro
    for epoch in itertools.count(progress.epoch if not skip else 0):
        stream.epoch = epoch
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False
        )
        produced = False
        for group in batches(note_skipped(iter(loader), stream), cfg.batch_tokens):
            produced = True
            if skip:
                skip -= 1
                continue
            progress.epoch = epoch
            yield _split(collator(group))
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
    stream = cache_dataset(
        cfg.eval_cache,
        shuffle=False,
        batch_tokens=cfg.batch_tokens,
        rank=0,
        world_size=1,  # every rank evaluates every batch
        storage_options=cfg.storage_options,
    )
    collator = KDCollator(cache)
    was_training = net.training
    net.eval()
    totals = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    for group in stream:
        inputs, teacher = _split(collator(group))
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


def _split(batch: dict[str, Any]) -> tuple[StudentInputs, TeacherBatch]:
    """The collator's batch as the student's inputs and the teacher's rows."""
    inputs = StudentInputs(batch["input_ids"], batch["attention_mask"], batch["kd_rows"])
    return inputs, batch["kd_teacher"]


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
    if spec.reads_topk and cache.layout.k == 0:
        raise IncompatibleCacheError(
            f"loss {cfg.loss} reads the teacher's top-k, and {cache.url} stores samples only "
            "(built with --top-k 0)",
            hint="train it with --loss rskd or --loss fkl-hybrid, or rebuild with --top-k 64",
        )
    if spec.needs_samples and cache.layout.num_samples == 0:
        raise IncompatibleCacheError(
            f"loss {cfg.loss} needs sampled tokens, but {cache.url} was built without them",
            hint="rebuild the cache with `kdcache build --samples 50` (or another N)",
        )
    drawn_at = cache.manifest.build.sample_temperature
    if spec.needs_samples and spec.sample_temperature not in (None, drawn_at):
        raise IncompatibleCacheError(
            f"loss {cfg.loss} needs samples drawn at temperature {spec.sample_temperature:g}, "
            f"and {cache.url} drew them at {drawn_at:g}",
            hint=f"rebuild the cache with --sample-temperature {spec.sample_temperature:g}, "
            "or use rskd, which reweights its draws",
        )


def _check_temperature(
    spec: LossSpec, options: dict[str, Any], cfg: TrainConfig, cache: Cache, say
) -> None:
    """Say once (or, with --strict-temperature, refuse) when the loss's tail terms need the
    teacher's lse at a temperature the cache did not store: they are then approximate (the
    teacher's tail tempered as one token), and the error can be large (rkl at k=12, T=2: x3)."""
    if not spec.tail_at_temperature:
        return
    t = options.get("temperature", cfg.temperature)
    t = float(spec.options.get("temperature", 1.0) if t is None else t)
    stored = cache.layout.temperatures
    if t == 1.0 or any(abs(t - s) < 1e-6 for s in stored):
        return
    message = (
        f"loss {cfg.loss} at temperature {t:g}: {cache.url} stores the teacher's log-sum-exp "
        f"only at T = 1{''.join(f', {s:g}' for s in stored)}, so its tail terms at {t:g} are "
        f"approximate (the share of rows affected is logged each step)"
    )
    fix = f"rebuild the cache with `kdcache build --temperatures {t:g}` to make them exact"
    if cfg.strict_temperature:
        raise IncompatibleCacheError(message, hint=fix)
    say(f"{message}; {fix}, or pass --strict-temperature to refuse")


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


def _say(message: str) -> None:
    print(f"kdcache: {message}", file=sys.stderr, flush=True)
