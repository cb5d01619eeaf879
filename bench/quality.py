"""`make bench-quality`: how many bytes per token of cache does a student need to learn as well
as from the live teacher?

One corpus, one teacher/student pair. Every method trains a fresh copy of the same student
(same seed: same initialisation and the same micro-batches in the same order) with the same
optimiser, schedule, steps and batch tokens; only the loss, and the cache it reads, differ:

* references: SFT (the registered ``ce`` loss, no teacher) and online full KD (the teacher
  co-resident, run on every micro-batch, dense forward KL over the whole vocabulary: the
  baseline a cache has to match; it lives here, never in student_trainer);
* top-k: ``fkl`` and ``fkl-tail`` at k = 8 ... 128, each from a top-k-only cache;
* sampled: ``rskd`` on s = 8 ... 64 draws per position, from a samples-only cache (top-k 0);
* hybrid: ``fkl-hybrid`` at k = 8 ... 64 with s = 8 ... 32 draws, from a cache with both.

Every cache holds the same sequences, and every method is scored on the same held-out tokens
against the dense teacher: validation CE on the true next tokens, the full KL(teacher ||
student) over the vocabulary, and top-1 agreement. Each point gets the bytes per token of the
cache it reads, and the frontier is the validation CE gap to online KD (paired over seeds)
against those bytes. Two settings: 100 steps on every seed, and 1000 steps (`LONG`, seed 0).
``--roster all`` adds every other registered loss at k = 64 (``bild`` at k = 8, as in its paper).
Builds and runs go to `--jobs` worker processes of one thread each; a run does not depend on
which worker ran it. Results go to bench/results/quality{.json,.md,.png,-frontier.png}.

    python -m bench.quality --jobs 2      # the full study: 22 builds, then 84 runs of 100
                                          # steps and 7 of 1000: 33 min on 2 cores (measured)
    python -m bench.quality --quick --results /tmp/q   # a smoke run (~1 min; --results keeps
                                                       # the study's results in bench/results)
    python -m bench.quality --no-long --only fkl --seeds 0   # part of the grid
    python -m bench.quality --roster all --no-long           # every registered loss
    python -m bench.quality --seeds 0 --steps 100 --teacher DIR --dataset a.jsonl \\
        --eval-dataset b.jsonl --student-config student.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_builder import BuildConfig, build
from schemas import open_cache
from student_trainer.batch import StudentInputs, collate, teacher_batch_from_logits
from student_trainer.dataset import ShardStream, batches
from student_trainer.losses import LOSSES
from student_trainer.losses._student import ChunkedStudent, DenseStudent
from student_trainer.student import HiddenAndHead
from student_trainer.train import _warmup_cosine

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ce", "kl", "top1")
NOT_METHODS = {"z-loss": "a student-only regulariser, weighted in beside a loss"}
FAMILIES = ("fkl", "fkl-tail", "rskd", "fkl-hybrid")
"""The frontier's families, one marker and colour each (other losses: `--roster all`)."""
BUDGETS = (32, 64, 128, 256)
"""Bytes per token of cache: for each, the method with the lowest mean gap that fits."""
GOAL_GAP = 0.005
"""The goal: within 0.5% of online KD's validation CE at no more bytes than the default cache."""


@dataclass(frozen=True)
class Sizes:
    """Everything that sizes a study; saved with the results."""

    steps: int = 100
    batch_tokens: int = 1024
    eval_tokens: int = 8192
    """Held-out tokens scored at every evaluation (a fixed subset spread over the split)."""
    eval_every: int = 50
    """Steps between held-out evaluations (each costs ~1 s; the final one is what is scored)."""
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    max_length: int = 256
    shard_tokens: int = 1 << 16
    top_k: tuple[int, ...] = (8, 16, 32, 64, 128)
    """fkl and fkl-tail, each from a top-k-only cache."""
    samples: tuple[int, ...] = (8, 16, 32, 64)
    """rskd, each from a samples-only cache."""
    hybrid_k: tuple[int, ...] = (8, 16, 32, 64)
    hybrid_samples: tuple[int, ...] = (8, 16, 32)
    """fkl-hybrid at every (k, s) of these two, each from a cache of both."""
    default_k: int = 64
    """`kdcache build`'s default: the top-k-only cache the references read, the held-out cache's
    k and the bytes the goal is measured against."""
    long_steps: int = 1000
    """The long setting: `LONG` on `long_seeds`, warm-up scaled with the steps (same shape)."""
    long_eval_every: int = 100
    train_stride: int = 3
    """Embedded corpus only: train on every n-th train document (a spread-out subset that
    still holds more tokens than `steps * batch_tokens`; the teacher pass stays short)."""
    eval_documents: int | None = None
    """Embedded corpus only: the first n validation documents (None: the whole split)."""

    def long(self) -> Sizes:
        """The long setting's sizes: more steps, the same schedule shape."""
        warmup = max(1, round(self.warmup * self.long_steps / self.steps))
        return replace(self, steps=self.long_steps, eval_every=self.long_eval_every, warmup=warmup)


QUICK = Sizes(
    steps=6,
    batch_tokens=1024,
    eval_tokens=1024,
    eval_every=3,
    warmup=2,
    top_k=(8,),
    samples=(8,),
    hybrid_k=(8,),
    hybrid_samples=(8,),
    long_steps=12,
    long_eval_every=6,
    train_stride=11,
    eval_documents=6,
)


@dataclass(frozen=True)
class Method:
    name: str
    """The row label."""
    loss: str | None
    """Registry name; None for the online full-KD baseline."""
    top_k: int
    samples: int = 0
    """The cache it reads: built with `top_k` and `samples` (the references read the default
    cache for their tokens only)."""
    family: str = "reference"
    """fkl, fkl-tail, rskd, fkl-hybrid, reference (SFT, online KD) or other (`--roster all`)."""

    @property
    def cache(self) -> str:
        return f"k{self.top_k}-s{self.samples}"


def topk(loss: str, k: int) -> Method:
    return Method(f"{loss} @{k}", loss, k, 0, loss if loss in FAMILIES else "other")


def sampled(s: int) -> Method:
    return Method(f"rskd ({s} samples)", "rskd", 0, s, "rskd")


def hybrid(k: int, s: int) -> Method:
    return Method(f"fkl-hybrid @{k} ({s} samples)", "fkl-hybrid", k, s, "fkl-hybrid")


def references(default_k: int = Sizes.default_k) -> tuple[Method, Method]:
    return (
        Method("sft (ce)", "ce", default_k),
        Method("online full KD", None, default_k),
    )


LONG = (
    *references(),
    topk("fkl", 64),
    topk("fkl-tail", 64),
    sampled(32),
    hybrid(32, 16),
    hybrid(64, 32),
)
"""The long setting's methods (1000 steps on seed 0)."""
QUICK_LONG = (*references(), topk("fkl", 8), hybrid(8, 8))


def methods(sizes: Sizes, roster: str = "frontier") -> list[Method]:
    """The references, then the frontier grid; `roster="all"` adds every other registered loss
    (at the default k; bild at the smallest k, as in its paper)."""
    rows = [
        *references(sizes.default_k),
        *(topk(loss, k) for loss in ("fkl", "fkl-tail") for k in sizes.top_k),
        *(sampled(s) for s in sizes.samples),
        *(hybrid(k, s) for k in sizes.hybrid_k for s in sizes.hybrid_samples),
    ]
    if roster == "all":
        grid = {m.loss for m in rows}
        for name in LOSSES:
            if name not in grid and name not in NOT_METHODS:
                rows.append(topk(name, min(sizes.top_k) if name == "bild" else sizes.default_k))
    elif roster != "frontier":
        raise ValueError(f"roster must be 'frontier' or 'all', not {roster!r}")
    return rows


def online_fkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the full forward KL(softmax(z) || softmax(s)), both (N, V).

    Computed in float32 at least (float64 inputs stay float64).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)  # (N, V)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (N, V)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def check_online_equals_registry(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """`online_fkl` against the registered fkl-tail fed the teacher at k = V: value and gradient.

    With k = V the tail bucket is empty, so fkl-tail is exactly the full FKL.
    """
    s1 = student_logits.detach().double().requires_grad_()
    s2 = student_logits.detach().double().requires_grad_()
    ours = online_fkl(s1, teacher_logits.double())
    full = teacher_batch_from_logits(teacher_logits, labels, k=teacher_logits.shape[-1])
    theirs = LOSSES["fkl-tail"].fn(DenseStudent(s2), full)
    ours.backward()
    theirs.backward()
    return {
        "online_fkl": ours.item(),
        "fkl_tail_at_k_eq_V": theirs.item(),
        "abs_diff": abs(ours.item() - theirs.item()),
        "grad_max_abs_diff": float((s1.grad - s2.grad).abs().max()),
    }


class _Teacher:
    """The teacher model, co-resident: dense logits at the rows of a micro-batch."""

    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        self.model.eval()

    @torch.no_grad()
    def logits(self, inputs: StudentInputs) -> torch.Tensor:
        out = self.model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False
        ).logits  # (B, L, V)
        return out.reshape(-1, out.shape[-1]).index_select(0, inputs.rows).float()  # (N, V)


@dataclass
class _EvalBatch:
    inputs: StudentInputs
    labels: torch.Tensor  # (N,)
    p: torch.Tensor  # (N, V) teacher probabilities
    neg_entropy: torch.Tensor  # (N,) sum p log p
    top1: torch.Tensor  # (N,) teacher argmax


class _HeldOut:
    """~eval_tokens of the held-out cache, with the dense teacher computed once.

    A fixed, spread-out subset: every n-th sequence in cache order, n chosen so that the picks
    cover the whole held-out set rather than its first few documents.
    """

    def __init__(self, url: str, teacher: _Teacher, sizes: Sizes, device: torch.device) -> None:
        cache = open_cache(url, require_complete=True)
        self.batches: list[_EvalBatch] = []
        self.n = 0
        nll = 0.0
        lse_diff, top1_same, label_lp_diff = 0.0, 0, 0.0
        sequences = list(ShardStream(url, shuffle=False))
        stride = max(1, sum(map(len, sequences)) // sizes.eval_tokens)
        for group in batches(iter(sequences[::stride]), max(4096, sizes.batch_tokens)):
            inputs, cached = collate(group, cache.layout.vocab_size)
            inputs, cached = inputs.to(device), cached.to(device)
            z = teacher.logits(inputs).double()  # (N, V)
            log_p = torch.log_softmax(z, dim=-1)
            p = log_p.exp()
            labels = cached.labels
            nll -= float(log_p.gather(1, labels.unsqueeze(1)).sum())
            # The live teacher must be the one in the cache: same lse, argmax and label log-prob.
            lse_diff = max(lse_diff, float((z.logsumexp(-1) - cached.lse).abs().max()))
            top1_same += int((z.argmax(-1) == cached.ids[:, 0]).sum())
            label_lp = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
            label_lp_diff = max(label_lp_diff, float((label_lp - cached.label_logprob).abs().max()))
            self.batches.append(
                _EvalBatch(
                    inputs,
                    labels,
                    p.float(),
                    (p * log_p).sum(-1).float(),
                    z.argmax(-1),
                )
            )
            self.n += labels.shape[0]
            if self.n >= sizes.eval_tokens:
                break
        self.teacher_ce = nll / self.n
        self.checks = {
            "teacher_lse_vs_cache_max_abs": lse_diff,
            "teacher_top1_vs_cache_agreement": top1_same / self.n,
            "teacher_label_logprob_vs_cache_max_abs": label_lp_diff,
        }

    @torch.no_grad()
    def evaluate(self, net: HiddenAndHead) -> dict[str, float]:
        was_training = net.training
        net.eval()
        ce = kl = agree = 0.0
        for b in self.batches:
            h, w, bias, _ = net(b.inputs.input_ids, b.inputs.attention_mask, b.inputs.rows)
            s = ChunkedStudent(h, w, bias).full()  # (N, V), the main head
            log_q = torch.log_softmax(s, dim=-1)
            ce -= float(log_q.gather(1, b.labels.unsqueeze(1)).sum())
            kl += float((b.neg_entropy - (b.p * log_q).sum(-1)).sum())
            agree += float((s.argmax(-1) == b.top1).sum())
        net.train(was_training)
        return {"ce": ce / self.n, "kl": kl / self.n, "top1": agree / self.n}


@dataclass(frozen=True)
class _Context:
    """What a worker needs to train any method of the study (picklable, hashable)."""

    teacher: str
    eval_cache: str
    caches: tuple[tuple[str, str], ...]
    """(`Method.cache`, url) of every train cache."""
    student_config: str
    device: str
    sizes: Sizes
    """Sizes the held-out set (eval_tokens, batch_tokens: the same in both settings)."""


class _Study:
    """One process's side of the study: the teacher, the held-out set (its dense teacher
    computed once) and the student config, made at the process's first run, kept for the rest."""

    def __init__(self, ctx: _Context) -> None:
        from transformers import AutoConfig

        self.device = torch.device(ctx.device)
        self.caches = dict(ctx.caches)
        self.teacher = _Teacher(ctx.teacher, self.device)
        self.held_out = _HeldOut(ctx.eval_cache, self.teacher, ctx.sizes, self.device)
        config = json.loads(Path(ctx.student_config).read_text())
        self.student_config = AutoConfig.for_model(**config)
        self.initial: dict[int, dict[str, float]] = {}

    def micro_batches(self, cache: str, seed: int, batch_tokens: int):
        """Endless micro-batches of the cache in student_trainer's order for `seed`."""
        layout = open_cache(cache, require_complete=True).manifest
        stream = ShardStream(cache, seed=seed)
        for epoch in itertools.count():
            stream.epoch = epoch
            for group in batches(iter(stream), batch_tokens):
                yield collate(
                    group,
                    layout.layout.vocab_size,
                    layout.layout.temperatures,
                    layout.build.sample_temperature,
                    num_samples=layout.layout.num_samples,
                )

    def train(self, method: Method, seed: int, sizes: Sizes) -> dict[str, Any]:
        """One run; with the digests of its micro-batches, for the parent's data-order check."""
        from transformers import AutoModelForCausalLM

        dev = self.device
        spec = LOSSES[method.loss] if method.loss else None
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.student_config, dtype=torch.float32)
        net = HiddenAndHead(model, aux_head=bool(spec and spec.aux_head)).to(dev)
        optimizer = torch.optim.AdamW(
            net.parameters(), lr=sizes.lr, weight_decay=sizes.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _warmup_cosine(sizes.warmup, sizes.steps)
        )
        if seed not in self.initial:  # the same init for every method of this seed
            self.initial[seed] = self.held_out.evaluate(net)
        curve = [{"step": 0, **self.initial[seed]}]
        data = self.micro_batches(self.caches[method.cache], seed, sizes.batch_tokens)
        digests: list[str] = []
        online_check: dict[str, float] | None = None
        stopped, start, eval_seconds = None, time.perf_counter(), 0.0
        for step in range(1, sizes.steps + 1):
            inputs, teacher = next(data)
            digests.append(_digest(inputs))
            inputs, teacher = inputs.to(dev), teacher.to(dev)
            h, weight, bias, aux = net(inputs.input_ids, inputs.attention_mask, inputs.rows)
            student = ChunkedStudent(h, weight, bias)  # (N, V) logits never built
            if spec is None:  # online full KD: the teacher runs on this very micro-batch
                z = self.teacher.logits(inputs)  # (N, V)
                s = student.full()  # (N, V)
                if online_check is None:  # once: the dense loss is the registry's at k = V
                    rows = slice(0, 256)
                    online_check = check_online_equals_registry(
                        s[rows], z[rows], teacher.labels[rows]
                    )
                loss = online_fkl(s, z)
            else:
                kwargs = {"aux_student": ChunkedStudent(h, aux, None)} if spec.aux_head else {}
                loss = spec.fn(student, teacher, **kwargs)
            if not torch.isfinite(loss):
                stopped = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), sizes.clip)
            optimizer.step()
            schedule.step()
            if step % sizes.eval_every == 0 or step == sizes.steps:
                tick = time.perf_counter()
                curve.append({"step": step, **self.held_out.evaluate(net)})
                eval_seconds += time.perf_counter() - tick
        seconds = time.perf_counter() - start - eval_seconds
        if stopped is not None:  # the weights stay as they were: the same scores at every point
            frozen = self.held_out.evaluate(net)
            due = [t for t in range(stopped, sizes.steps + 1) if t % sizes.eval_every == 0]
            curve += [{"step": t, **frozen} for t in sorted({*due, sizes.steps})]
        held_out = self.held_out
        return {
            "curve": curve,
            "final": {m: curve[-1][m] for m in METRICS},
            "seconds": seconds,
            "eval_seconds": eval_seconds,
            "nonfinite_loss_at_step": stopped,
            "digests": digests,
            "online_check": online_check,
            "held_out": {"n": held_out.n, "teacher_ce": held_out.teacher_ce, **held_out.checks},
        }


def _digest(inputs: StudentInputs) -> str:
    return hashlib.blake2b(inputs.input_ids.numpy().tobytes(), digest_size=16).hexdigest()


_STUDIES: dict[_Context, _Study] = {}
"""This process's study (one at a time)."""


def _init_worker(threads: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)


def _build_task(cfg: BuildConfig) -> str:
    return build(cfg).summary()


def _train_task(ctx: _Context, method: Method, seed: int, sizes: Sizes) -> dict[str, Any]:
    if ctx not in _STUDIES:
        _STUDIES.clear()
        _STUDIES[ctx] = _Study(ctx)
    return _STUDIES[ctx].train(method, seed, sizes)


class _Pool:
    """`jobs` spawned worker processes of `threads` torch threads each, or, for one job, this
    process (at `threads` threads until closed). Tasks start in the order given."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.executor: ProcessPoolExecutor | None = None
        self.threads_before = torch.get_num_threads()
        if jobs > 1:
            self.executor = ProcessPoolExecutor(
                jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(threads,),
            )
        else:
            _init_worker(threads)

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.executor is not None:  # on an error: drop the queued tasks, not the running
            self.executor.shutdown(wait=kind is None, cancel_futures=True)
        torch.set_num_threads(self.threads_before)

    def map(
        self,
        fn: Callable[..., Any],
        tasks: Iterable[tuple[Any, ...]],
        done: Callable[[int, Any], None],
    ) -> list[Any]:
        """`fn(*args)` for each of `tasks`, the results in task order; `done(i, result)` as
        task i finishes."""
        tasks = list(tasks)
        if self.executor is None:
            results = []
            for i, args in enumerate(tasks):
                results.append(fn(*args))
                done(i, results[-1])
            return results
        futures: dict[Future[Any], int] = {
            self.executor.submit(fn, *args): i for i, args in enumerate(tasks)
        }
        out: list[Any] = [None] * len(tasks)
        for future in as_completed(futures):
            i = futures[future]
            out[i] = future.result()
            done(i, out[i])
        return out


def check_order(digests: dict[tuple[str, int], list[str]]) -> None:
    """Every run of a seed saw the same micro-batches at the same steps (over the steps two
    runs share: the long setting's runs go on where the short ones stop).

    `digests`: (run label, seed) -> a digest of each step's micro-batch.
    """
    by_seed: dict[int, list[tuple[str, list[str]]]] = {}
    for (label, seed), steps in digests.items():
        by_seed.setdefault(seed, []).append((label, steps))
    for seed, runs in by_seed.items():
        longest, reference = max(runs, key=lambda run: len(run[1]))
        for label, steps in runs:
            for step, (a, b) in enumerate(zip(steps, reference, strict=False), start=1):
                if a != b:
                    raise AssertionError(
                        f"{label}, seed {seed}: step {step} saw other tokens than {longest}"
                    )


def _build_caches(
    pool: _Pool,
    out: Path,
    sizes: Sizes,
    needed: dict[str, tuple[int, int]],
    teacher: str,
    dataset: str,
    eval_dataset: str,
) -> dict[str, str]:
    """The train caches `needed` (`Method.cache` -> (top_k, samples)), all of the same
    sequences, and the held-out cache ("eval")."""
    common = dict(
        teacher=teacher,
        max_length=sizes.max_length,
        shard_tokens=sizes.shard_tokens,
        batch_tokens=max(4096, sizes.max_length),
        overwrite=True,
        progress=False,
    )
    configs = {
        key: BuildConfig(
            out=str(out / f"train-{key}"),
            top_k=k,
            samples=s,
            dataset=dataset,
            split="train",
            **common,
        )
        for key, (k, s) in sorted(needed.items(), key=lambda kv: -sum(kv[1]))  # longest first
    }
    configs["eval"] = BuildConfig(
        out=str(out / f"valid-k{sizes.default_k}"),
        top_k=sizes.default_k,
        dataset=eval_dataset,
        split="train",
        **common,
    )
    pool.map(_build_task, [(cfg,) for cfg in configs.values()], lambda _, summary: _say(summary))
    shards = {
        key: (m.dataset.fingerprint, [(s.num_tokens, s.num_sequences) for s in m.shards])
        for key in needed
        for m in [open_cache(configs[key].out).manifest]
    }
    first = next(iter(shards))
    differ = [key for key, layout in shards.items() if layout != shards[first]]
    if differ:
        raise AssertionError(
            f"the train caches must hold the same sequences in the same shards: "
            f"{', '.join(differ)} differ from {first}"
        )
    return {key: cfg.out for key, cfg in configs.items()}


def bytes_per_token(url: str) -> float:
    """Bytes on disk of the cache's shards per token."""
    manifest = open_cache(url, require_complete=True).manifest
    return sum(s.nbytes for s in manifest.shards) / manifest.num_tokens


def _subset(split: str, stride: int, limit: int | None, folder: Path) -> str:
    """Every `stride`-th of the first `limit` documents of the embedded corpus `split`, as
    jsonl (read back as split "train": the builder takes a file's rows as that split)."""
    from cache_builder.default import default_corpus

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-every{stride}-first{limit or 'all'}.jsonl"
    docs = default_corpus(split)[:limit][::stride]  # type: ignore[arg-type]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def run(
    quick: bool = False,
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int | None = None,
    batch_tokens: int | None = None,
    eval_tokens: int | None = None,
    eval_every: int | None = None,
    *,
    long: bool = True,
    long_seeds: tuple[int, ...] = (0,),
    long_steps: int | None = None,
    roster: str = "frontier",
    jobs: int = 2,
    threads: int = 1,
    teacher: str | None = None,
    dataset: str | None = None,
    eval_dataset: str | None = None,
    student_config: str | None = None,
    device: str = "auto",
    out: str | Path = "runs/quality",
    only: tuple[str, ...] | None = None,
    results: str | Path | None = RESULTS,
) -> dict[str, Any]:
    """Run the study and return its results; also write them under `results` (None: don't).

    The 100-step setting runs every method of `roster` on every seed; the long one (`long`)
    runs `LONG` (`QUICK_LONG` when `quick`) for `long_steps` on `long_seeds`. `only` keeps the
    methods whose names start with one of its entries (SFT and online KD are always kept, as
    the references). Caches are built, and runs trained, by `jobs` processes of `threads`
    torch threads each; the long runs start first (they are the longest).
    """
    from cache_builder.default import DEFAULT_TEACHER_DIR
    from student_trainer.default import DEFAULT_STUDENT_CONFIG

    start = time.perf_counter()
    given = dict(steps=steps, batch_tokens=batch_tokens, eval_tokens=eval_tokens)
    sizes = replace(QUICK if quick else Sizes(), **{k: v for k, v in given.items() if v})
    if eval_every or steps:
        sizes = replace(sizes, eval_every=eval_every or max(1, sizes.steps // 5))
    if sizes.warmup >= sizes.steps:
        sizes = replace(sizes, warmup=max(1, sizes.steps // 10))
    if long_steps:
        sizes = replace(sizes, long_steps=long_steps, long_eval_every=max(1, long_steps // 10))
    dev = torch.device(
        device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )

    def keep(rows: Iterable[Method]) -> list[Method]:
        return [
            m
            for m in rows
            if only is None
            or m.loss in ("ce", None)
            or any(m.name.startswith(prefix) for prefix in only)
        ]

    chosen = keep(methods(sizes, roster))
    chosen_long = keep(QUICK_LONG if quick else LONG) if long else []
    settings = {"short": (sizes, chosen, seeds), "long": (sizes.long(), chosen_long, long_seeds)}
    out = Path(out) / ("quick" if quick else "full")
    dataset = dataset or _subset("train", sizes.train_stride, None, out / "data")
    eval_dataset = eval_dataset or _subset("validation", 1, sizes.eval_documents, out / "data")
    teacher_dir = teacher or str(DEFAULT_TEACHER_DIR)
    config_path = Path(student_config or DEFAULT_STUDENT_CONFIG)
    needed = {m.cache: (m.top_k, m.samples) for m in chosen + chosen_long}

    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
        setting: {m.name: {} for m in rows} for setting, (_, rows, _) in settings.items()
    }
    digests: dict[tuple[str, int], list[str]] = {}

    order = [  # the long runs first: they are the longest tasks
        (setting, m, seed)
        for setting in ("long", "short")
        for seed in settings[setting][2]
        for m in settings[setting][1]
    ]

    def done(i: int, r: dict[str, Any]) -> None:
        setting, m, seed = order[i]
        setting_sizes = settings[setting][0]
        digests[(f"{m.name} ({setting_sizes.steps} steps)", seed)] = r.pop("digests")
        runs[setting][m.name][str(seed)] = r
        f = r["final"]
        _say(
            f"{setting:<5} seed {seed} {m.name:<28} CE {f['ce']:.4f}  KL {f['kl']:.4f}  "
            f"top-1 {f['top1']:.3f}  ({r['seconds']:.0f} s, {r['eval_seconds']:.0f} s eval)"
        )

    with _Pool(jobs, threads) as pool:
        caches = _build_caches(pool, out, sizes, needed, teacher_dir, dataset, eval_dataset)
        vocab = open_cache(caches["eval"]).layout.vocab_size
        student_vocab = json.loads(config_path.read_text())["vocab_size"]
        if student_vocab != vocab:
            raise ValueError(f"student vocabulary {student_vocab} != teacher's {vocab}")
        ctx = _Context(
            teacher=teacher_dir,
            eval_cache=caches["eval"],
            caches=tuple((key, url) for key, url in caches.items() if key != "eval"),
            student_config=str(config_path),
            device=str(dev),
            sizes=sizes,
        )
        tasks = [(ctx, m, seed, settings[setting][0]) for setting, m, seed in order]
        pool.map(_train_task, tasks, done)
    check_order(digests)
    nbytes = {key: bytes_per_token(url) for key, url in caches.items()}
    report = _report(settings, runs, nbytes, time.perf_counter() - start)
    report["teacher"]["coverage"] = coverage(
        {key: url for key, url in caches.items() if key == "eval" or key.endswith("-s0")}
    )
    report["settings"].update(
        roster=roster,
        jobs=jobs,
        threads_per_job=threads,
        device=str(dev),
        teacher=teacher_dir,
        student_config=str(config_path),
        caches=caches,
        bytes_per_token=nbytes,
        quick=quick,
    )
    if results is not None:
        _write(report, Path(results))
    return report


def coverage(caches: dict[str, str]) -> dict[str, dict[str, float]]:
    """How much of the teacher each cache holds: mean tail mass outside the cached ids, how
    often the label is among them, the mean top-1 probability."""
    from schemas.stats import teacher_stats

    out = {}
    for name, url in caches.items():
        stats = teacher_stats(open_cache(url), sample_tokens=1 << 30, seed=0)
        out[name] = {
            "k": open_cache(url).layout.k,
            **{key: stats[key] for key in ("mean_tail_mass", "label_in_topk", "mean_top1_prob")},
        }
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _rows(
    sizes: Sizes,
    chosen: list[Method],
    runs: dict[str, dict[str, Any]],
    nbytes: dict[str, float],
) -> dict[str, Any]:
    """One row per method of a setting: metrics over seeds, paired against the references."""
    sft, online = chosen[0].name, chosen[1].name
    rows: dict[str, Any] = {}
    for m in chosen:
        per_seed = runs[m.name]
        seeds = list(per_seed)  # every method runs on every seed: paired differences
        stats = {
            metric: _mean_std([per_seed[s]["final"][metric] for s in seeds]) for metric in METRICS
        }
        vs_sft = [per_seed[s]["final"]["ce"] - runs[sft][s]["final"]["ce"] for s in seeds]
        vs_online = [
            per_seed[s]["final"]["ce"] / runs[online][s]["final"]["ce"] - 1.0 for s in seeds
        ]
        steps = [p["step"] for p in per_seed[seeds[0]]["curve"]]
        curve = [
            float(np.mean([per_seed[s]["curve"][i]["ce"] for s in seeds]))
            for i in range(len(steps))
        ]
        reference = m.family == "reference"
        rows[m.name] = {
            "loss": m.loss or "online dense FKL",
            "family": m.family,
            "k": None if reference else m.top_k,
            "samples": None if reference else m.samples,
            "cache": m.cache,
            "bytes_per_token": None if reference else nbytes[m.cache],
            "seeds": [int(x) for x in seeds],
            **{metric: {"mean": v[0], "std": v[1]} for metric, v in stats.items()},
            "ce_minus_sft": dict(zip(("mean", "std"), _mean_std(vs_sft), strict=True)),
            "seeds_better_than_sft": sum(d < 0 for d in vs_sft),
            "ce_gap_vs_online": dict(zip(("mean", "std"), _mean_std(vs_online), strict=True)),
            "seconds_per_step": float(
                np.mean([per_seed[s]["seconds"] for s in seeds]) / sizes.steps
            ),
            "curve_steps": steps,
            "curve_ce_mean": curve,
            "nonfinite": [s for s in seeds if per_seed[s]["nonfinite_loss_at_step"]],
            "runs": per_seed,
        }
    return rows


def frontier(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per cached method, by bytes/token: its paired gap to online KD (mean, std)."""
    points = [
        {
            "method": name,
            "family": r["family"],
            "k": r["k"],
            "samples": r["samples"],
            "bytes_per_token": r["bytes_per_token"],
            "gap": r["ce_gap_vs_online"]["mean"],
            "gap_std": r["ce_gap_vs_online"]["std"],
            "seeds": len(r["seeds"]),
        }
        for name, r in rows.items()
        if r["bytes_per_token"] is not None
    ]
    return sorted(points, key=lambda p: (p["bytes_per_token"], p["gap"]))


def pareto(points: list[dict[str, Any]]) -> list[str]:
    """The methods no other beats: the lowest gap at no more bytes, by bytes."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["bytes_per_token"], p["gap"])):
        if p["gap"] < best:  # NaN never is
            front.append(p["method"])
            best = p["gap"]
    return front


def best_within(points: list[dict[str, Any]], budget: float) -> str | None:
    """The method of lowest mean gap whose cache fits in `budget` bytes/token (None: none)."""
    fits = [p for p in points if p["bytes_per_token"] <= budget and p["gap"] == p["gap"]]
    return min(fits, key=lambda p: p["gap"])["method"] if fits else None


def _report(
    settings: dict[str, tuple[Sizes, list[Method], tuple[int, ...]]],
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]],
    nbytes: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    checked = [r for setting in runs.values() for m in setting.values() for r in m.values()]
    held = [r.pop("held_out") for r in checked]
    held_out = held[0]
    if any(h != held_out for h in held):
        raise AssertionError("the workers' held-out sets differ (teacher or eval tokens)")
    online = [r.pop("online_check") for r in checked]
    online_check = max((c for c in online if c), key=lambda c: c["abs_diff"], default=None)
    sizes, chosen, seeds = settings["short"]
    rows = _rows(sizes, chosen, runs["short"], nbytes)
    long_sizes, long_chosen, long_seeds = settings["long"]
    long = None
    if long_chosen:
        long_rows = _rows(long_sizes, long_chosen, runs["long"], nbytes)
        long = {
            "settings": {
                "steps": long_sizes.steps,
                "eval_every": long_sizes.eval_every,
                "warmup": long_sizes.warmup,
                "seeds": list(long_seeds),
                "methods": [asdict(m) for m in long_chosen],
            },
            "methods": long_rows,
            "summary": {"pareto": pareto(frontier(long_rows))},
        }
    sft, online_name = chosen[0].name, chosen[1].name
    beats = [n for n in rows if n != sft and rows[n]["ce"]["mean"] < rows[sft]["ce"]["mean"]]
    points = frontier(rows)
    default = f"k{sizes.default_k}-s0"
    best = best_within(points, nbytes[default])
    key = f"fkl @{sizes.default_k}"
    return {
        "settings": {
            **asdict(sizes),
            "seeds": list(seeds),
            "methods": [asdict(m) for m in chosen],
            "not_run": NOT_METHODS,
            "seconds": seconds,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "held_out_tokens": held_out["n"],
        },
        "teacher": {"held_out_ce": held_out["teacher_ce"]},
        "checks": {
            **{k: v for k, v in held_out.items() if k not in ("n", "teacher_ce")},
            "online_kd_vs_fkl_tail_at_k_eq_V": online_check,
            "same_data_order": "asserted for every method, seed and step (both settings)",
        },
        "methods": rows,
        "long": long,
        "summary": {
            "ce_gap_vs_online": {
                p["method"]: rows[p["method"]]["ce_gap_vs_online"] for p in points
            },
            "goal_fkl_top64_within_1pct": (
                rows[key]["ce_gap_vs_online"]["mean"] <= 0.01 if key in rows else None
            ),
            "better_than_sft": beats,
            "goal_some_loss_beats_sft": any(n != online_name for n in beats),
            "frontier": points,
            "pareto": pareto(points),
            "default_cache": {
                "top_k": sizes.default_k,
                "samples": 0,
                "bytes_per_token": nbytes[default],
            },
            "best_within_default_bytes": best,
            "goal_within_half_percent": (
                None if best is None else rows[best]["ce_gap_vs_online"]["mean"] <= GOAL_GAP
            ),
            "by_budget": {str(b): best_within(points, b) for b in BUDGETS},
        },
    }


def _fmt(stat: dict[str, float], n: int, digits: int = 3, scale: float = 1.0) -> str:
    mean = f"{scale * stat['mean']:+.{digits}f}" if scale != 1.0 else f"{stat['mean']:.{digits}f}"
    return mean if n < 2 else f"{mean} ± {scale * stat['std']:.{digits}f}"


def _table(rows: dict[str, Any]) -> list[str]:
    names = list(rows)
    sft, online = names[0], names[1]
    lines = [
        "| method | k | samples | bytes/token | seeds | val CE (nats) | KL(teacher‖student) "
        "| top-1 agreement | ΔCE vs SFT (paired) | CE vs online KD | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        n = len(r["seeds"])
        k = "V (dense)" if name == online else "—" if r["k"] is None else r["k"]
        samples = "—" if r["samples"] is None else r["samples"]
        nbytes = "—" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        delta = (
            "—"
            if name == sft
            else f"{_fmt(r['ce_minus_sft'], n)} ({r['seeds_better_than_sft']}/{n} lower)"
        )
        gap = "—" if name == online else f"{_fmt(r['ce_gap_vs_online'], n, 2, 100.0)}%"
        lines.append(
            f"| {name} | {k} | {samples} | {nbytes} | {n} | {_fmt(r['ce'], n)} "
            f"| {_fmt(r['kl'], n)} | {_fmt(r['top1'], n)} | {delta} | {gap} "
            f"| {r['seconds_per_step']:.2f} |"
        )
    return lines


def _point(rows: dict[str, Any], name: str | None) -> str:
    if name is None:
        return "none"
    r = rows[name]
    gap = _fmt(r["ce_gap_vs_online"], len(r["seeds"]), 2, 100.0)
    return f"{name} ({r['bytes_per_token']:.1f} B/token, {gap}%)"


def markdown(report: dict[str, Any]) -> str:
    """The tables, the frontier and a reading of them, generated from the numbers."""
    s, rows = report["settings"], report["methods"]
    names = list(rows)
    sft = names[0]
    summary = report["summary"]
    reading = [
        "",
        f"Teacher CE on the same {s['held_out_tokens']} held-out tokens: "
        f"{report['teacher']['held_out_ce']:.3f} nats. Every run: {s['steps']} steps of "
        f"~{s['batch_tokens']} tokens, AdamW lr {s['lr']} (warm-up {s['warmup']}, cosine to 10%), "
        f"clip {s['clip']}; every method on seeds {s['seeds']}. Mean ± sample std over seeds; "
        "ΔCE and the gap to online KD are paired by seed (same initialisation and data order). "
        "bytes/token: the shards of the cache a method reads over its tokens (the references "
        "read no teacher signal from a cache). s/step excludes evaluation.",
        "",
    ]
    cov = report["teacher"].get("coverage")
    if cov:
        parts = [
            f"{'held-out' if name == 'eval' else 'train'} top-{c['k']}: "
            f"{100 * c['mean_tail_mass']:.1f}% of the mass outside, label outside on "
            f"{100 * (1 - c['label_in_topk']):.1f}% of positions"
            for name, c in cov.items()
        ]
        reading.append(
            "- What the top-k caches hold of the teacher (mean over positions): "
            + "; ".join(parts)
            + ". fkl drops that tail and fkl-tail keeps only its total mass, while online KD "
            "sees its shape; rskd's and fkl-hybrid's samples reach into it."
        )
    beats = summary["better_than_sft"]
    clear = [n for n in beats if rows[n]["seeds_better_than_sft"] == len(rows[n]["seeds"]) > 1]
    reading.append(
        f"- Lower mean validation CE than SFT: {', '.join(beats) or 'none'}; "
        f"lower on every one of several seeds: {', '.join(clear) or 'none'}."
    )
    worse = [n for n in names if n != sft and n not in beats]
    reading.append(f"- Not better than SFT: {', '.join(worse) or 'none'}.")
    verdict = "met" if summary["goal_some_loss_beats_sft"] else "NOT met"
    reading.append(f"- Goal 'at least one cached loss better than SFT': {verdict}.")
    if summary["goal_fkl_top64_within_1pct"] is not None:
        key = f"fkl @{s['default_k']}"
        verdict = "met" if summary["goal_fkl_top64_within_1pct"] else "NOT met"
        reading.append(f"- Goal '{key} within 1% of online KD': {verdict} ({_point(rows, key)}).")
    if any(r["nonfinite"] for r in rows.values()):
        bad = [f"{n} (seeds {r['nonfinite']})" for n, r in rows.items() if r["nonfinite"]]
        reading.append(f"- Non-finite loss, training stopped early: {', '.join(bad)}.")
    c = report["checks"]
    oc = c["online_kd_vs_fkl_tail_at_k_eq_V"] or {}
    reading += [
        f"- Checks: the live teacher reproduces the cache (max |lse diff| "
        f"{c['teacher_lse_vs_cache_max_abs']:.1e}, top-1 agreement "
        f"{c['teacher_top1_vs_cache_agreement']:.4f}); the online loss equals the registered "
        f"fkl-tail fed the full teacher (k = V) to {oc.get('abs_diff', float('nan')):.1e} "
        f"(gradients {oc.get('grad_max_abs_diff', float('nan')):.1e}); every cache holds the "
        "same sequences and every method saw the same micro-batches in the same order (both "
        "settings, over the steps they share).",
        "- Not run as a method: "
        + "; ".join(f"{n} ({why})" for n, why in s["not_run"].items())
        + (
            ". The other registered losses run with `--roster all`."
            if s.get("roster", "frontier") == "frontier"
            else ". Losses run with their registered defaults only (dkd, nkd and gld include "
            "the CE term their papers add, dual-head its own; dual-head is scored on its main "
            "head)."
        ),
    ]
    return "\n".join(_table(rows) + reading + _frontier_lines(report) + _long_lines(report)) + "\n"


def _frontier_lines(report: dict[str, Any]) -> list[str]:
    rows, summary = report["methods"], report["summary"]
    default = summary["default_cache"]
    sft_gap = rows[next(iter(rows))]["ce_gap_vs_online"]["mean"]
    best = summary["best_within_default_bytes"]
    goal = {True: "met", False: "NOT met", None: "not measured"}[
        summary["goal_within_half_percent"]
    ]
    lines = [
        "",
        "## Bytes per token against quality",
        "",
        "Validation CE gap to online full KD (paired by seed, mean ± std over seeds) against the "
        "bytes per token of the cache each method reads; SFT's gap is "
        f"{100 * sft_gap:+.2f}%.",
        "",
        "- Pareto front (lowest gap at no more bytes), by bytes: "
        + "; ".join(_point(rows, name) for name in summary["pareto"])
        + ".",
        f"- The default cache (top-{default['top_k']}, no samples) takes "
        f"{default['bytes_per_token']:.1f} B/token. Lowest gap within it: {_point(rows, best)}: "
        f"the goal (within {100 * GOAL_GAP:.1f}% of online KD) is {goal}.",
    ]
    lines += [
        f"- Within {budget} B/token, the lowest mean gap: {_point(rows, name)}."
        for budget, name in summary["by_budget"].items()
    ]
    return lines


def _long_lines(report: dict[str, Any]) -> list[str]:
    long = report.get("long")
    if not long:
        return []
    s = long["settings"]
    rows = long["methods"]
    online = list(rows)[1]
    best = min(
        (n for n in rows if n != online and rows[n]["bytes_per_token"] is not None),
        key=lambda n: rows[n]["ce_gap_vs_online"]["mean"],
        default=None,
    )
    return [
        "",
        f"## Long setting: {s['steps']} steps, seeds {s['seeds']}",
        "",
        *_table(rows),
        "",
        f"The same student, data order and schedule shape (warm-up {s['warmup']}, cosine to "
        f"10%), evaluated every {s['eval_every']} steps. Lowest gap to online KD among the "
        f"cached methods: {_point(rows, best)}; Pareto front: "
        + "; ".join(_point(rows, name) for name in long["summary"]["pareto"])
        + ".",
    ]


STYLE = {
    "fkl": ("C0", "o", "Blues"),
    "fkl-tail": ("C1", "s", "Oranges"),
    "rskd": ("C2", "^", "Greens"),
    "fkl-hybrid": ("C3", "D", "Reds"),
    "other": ("C7", "x", "Greys"),
}
"""Colour, marker and colour map (curves: a shade per member) of each family."""


def _colors(rows: dict[str, Any]) -> dict[str, Any]:
    """A colour per method: the references grey and black, the rest a shade of their family's
    colour map, darker with more bytes."""
    import matplotlib.pyplot as plt

    colors = {}
    for family, (_, _, cmap) in STYLE.items():
        mine = [n for n, r in rows.items() if r["family"] == family]
        shades = np.linspace(0.45, 0.9, len(mine)) if len(mine) > 1 else [0.7] * len(mine)
        for name, shade in zip(mine, shades, strict=True):
            colors[name] = plt.get_cmap(cmap)(shade)
    names = list(rows)
    return {**colors, names[0]: "grey", names[1]: "black"}


def _curves(axes: Any, rows: dict[str, Any]) -> None:
    """Validation CE against steps, one line per method (mean over its seeds); the right
    panel zooms on the second half of training."""
    colors = _colors(rows)
    last = max(r["curve_steps"][-1] for r in rows.values())
    for ax, first in zip(axes, (0, last / 2), strict=True):
        values = []
        for i, (name, r) in enumerate(rows.items()):
            keep = [j for j, step in enumerate(r["curve_steps"]) if step >= first]
            xs = [r["curve_steps"][j] for j in keep]
            ys = [r["curve_ce_mean"][j] for j in keep]
            values += ys if first else ys[1:]  # the full panel's y range skips step 0
            ax.plot(
                xs,
                ys,
                marker="." if first else None,
                label=name if len(r["seeds"]) > 1 else f"{name} (1 seed)",
                color=colors[name],
                linewidth=2.2 if i < 2 else 1.1,
                linestyle="--" if i == 0 else "-",
            )
        if values:
            lo, hi = min(values), max(values)
            pad = 0.05 * (hi - lo) + 1e-6
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation CE (nats)")
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2)


def plot(report: dict[str, Any], target: Path) -> None:
    """Validation CE against steps: a row of two panels per setting (100 steps, long)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(report["settings"], report["methods"])]
    if report.get("long"):
        settings.append((report["long"]["settings"], report["long"]["methods"]))
    fig, axes = plt.subplots(len(settings), 2, figsize=(17, 5.5 * len(settings)), squeeze=False)
    for row, (s, rows) in zip(axes, settings, strict=True):
        _curves(row, rows)
        row[0].set_title(
            f"validation CE (mean over seeds {s['seeds']}); "
            f"teacher {report['teacher']['held_out_ce']:.2f} nats"
        )
        tokens = report["settings"]["batch_tokens"]
        row[1].set_title(f"second half; {s['steps']} steps of ~{tokens} tokens")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def plot_frontier(report: dict[str, Any], target: Path) -> None:
    """Gap to online KD (%) against bytes/token of cache (log x): a point per method with its
    std over seeds, the Pareto front as a step line, the references and the default cache."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, summary = report["methods"], report["summary"]
    points = summary["frontier"]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for family, (color, marker, _) in STYLE.items():
        mine = [p for p in points if p["family"] == family]
        if mine:
            ax.errorbar(
                [p["bytes_per_token"] for p in mine],
                [100 * p["gap"] for p in mine],
                yerr=[100 * p["gap_std"] for p in mine],
                fmt=marker,
                color=color,
                label=family,
                capsize=3,
                markersize=6,
                alpha=0.85,
            )
    by_name = {p["method"]: p for p in points}
    front = [by_name[name] for name in summary["pareto"]]
    if front:
        xs = [p["bytes_per_token"] for p in front]
        ys = [100 * p["gap"] for p in front]
        right = max(p["bytes_per_token"] for p in points) * 1.3
        ax.step(
            [*xs, right], [*ys, ys[-1]], where="post", color="black", lw=1.2, label="Pareto front"
        )
        for p in front:
            ax.annotate(
                p["method"],
                (p["bytes_per_token"], 100 * p["gap"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=7,
            )
    sft = rows[next(iter(rows))]["ce_gap_vs_online"]["mean"]
    ax.axhline(0.0, color="black", ls="--", lw=1, label="online full KD")
    ax.axhline(100 * sft, color="grey", ls=":", lw=1.2, label="SFT")
    default = summary["default_cache"]
    ax.axvline(
        default["bytes_per_token"],
        color="C4",
        ls="-.",
        lw=1,
        label=f"default cache (top-{default['top_k']})",
    )
    ax.set_xscale("log")
    spent = [p["bytes_per_token"] for p in points] + [default["bytes_per_token"]]
    ax.set_xticks([2**i for i in range(2, 12) if min(spent) / 2 <= 2**i <= max(spent) * 2])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("cache bytes per token (log)")
    ax.set_ylabel("validation CE gap to online full KD (%, paired over seeds)")
    s = report["settings"]
    ax.set_title(f"bytes vs quality: {s['steps']} steps, seeds {s['seeds']}; error bars: std")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def _write(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quality.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    head = (
        "# Distillation quality: bytes of cache per token against online full KD and SFT\n\n"
        "Written by `python -m bench.quality` (`make bench-quality`).\n\n"
    )
    figures = "\n![bytes vs quality](quality-frontier.png)\n\n![validation CE](quality.png)\n"
    (folder / "quality.md").write_text(head + table + figures)
    plot(report, folder / "quality.png")
    plot_frontier(report, folder / "quality-frontier.png")
    print(table, flush=True)


def _say(message: str) -> None:
    print(f"bench.quality: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {Sizes.steps})")
    parser.add_argument("--batch-tokens", type=int, help=f"default {Sizes.batch_tokens}")
    parser.add_argument("--eval-tokens", type=int, help=f"default {Sizes.eval_tokens}")
    parser.add_argument("--eval-every", type=int, help=f"default {Sizes.eval_every}")
    parser.add_argument(
        "--no-long", dest="long", action="store_false", help="skip the long setting (LONG)"
    )
    parser.add_argument(
        "--long-steps", type=int, help=f"the long setting's steps (default {Sizes.long_steps})"
    )
    parser.add_argument(
        "--long-seeds", type=int, nargs="+", default=[0], help="the long setting's seeds"
    )
    parser.add_argument(
        "--roster",
        choices=("frontier", "all"),
        default="frontier",
        help="frontier: the bytes/quality grid; all: also every other registered loss",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="worker processes for builds and runs (default 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per job (default 1)"
    )
    parser.add_argument("--teacher", help="teacher directory (default: the embedded teacher)")
    parser.add_argument("--dataset", help="train data file (default: the embedded corpus)")
    parser.add_argument("--eval-dataset", help="held-out data file (default: its validation split)")
    parser.add_argument("--student-config", help="student JSON config (default: the embedded one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--out", default="runs/quality", help="where the caches go")
    parser.add_argument(
        "--only", nargs="+", help="only methods whose names start so (+ SFT, online)"
    )
    parser.add_argument("--results", default=str(RESULTS), help="where quality.* are written")
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    args = parser.parse_args(argv)
    run(
        quick=args.quick,
        seeds=tuple(args.seeds if not args.quick or args.seeds != [0, 1, 2] else [0]),
        steps=args.steps,
        batch_tokens=args.batch_tokens,
        eval_tokens=args.eval_tokens,
        eval_every=args.eval_every,
        long=args.long,
        long_seeds=tuple(args.long_seeds),
        long_steps=args.long_steps,
        roster=args.roster,
        jobs=args.jobs,
        threads=args.threads,
        teacher=args.teacher,
        dataset=args.dataset,
        eval_dataset=args.eval_dataset,
        student_config=args.student_config,
        device=args.device,
        out=args.out,
        only=tuple(args.only) if args.only else None,
        results=args.results,
    )


if __name__ == "__main__":
    main()
