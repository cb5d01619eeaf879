"""Train the default teacher from scratch on the default corpus, on one CPU thread.

    python -m cache_builder.default.make_teacher --out cache_builder/default/teacher --seed 0 \\
        --minutes 20

Three steps, all deterministic from ``--seed`` once the number of steps is fixed:

1. a byte-level BPE tokenizer (``tokenizers``) on the train split, with ``<|endoftext|>`` as its
   only special token (bos, eos and pad, id 0) and a tiny chat template;
2. a small Llama trained with AdamW, linear warmup and cosine decay on the train split, packed
   GPT-2 style into sequences of ``seq_len`` tokens (every document is preceded by
   ``<|endoftext|>``; attention crosses document boundaries), with the validation loss printed
   along the way;
3. the model saved in bfloat16 safetensors beside the tokenizer, plus ``TRAINING.json`` with the
   settings, corpus statistics, the Python version whose documentation was used and the loss
   curve.

The run length is ``--epochs`` over the train split (6 by default: on this small corpus more
epochs barely lower the validation loss but let the teacher memorise the train split, and the
demo's cache is built on that split). ``--minutes`` caps it on slow machines, by timing a few
throwaway steps first; only then does the run length depend on the machine. ``TRAINING.json``
records the steps taken: pass them back with ``--steps`` to reproduce a teacher exactly (same
Python docs, torch version and CPU kind).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cache_builder.default import default_corpus

EOT = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True, kw_only=True)
class TeacherRecipe:
    """Everything that decides the teacher; saved to ``TRAINING.json`` with the result."""

    seed: int = 0
    """Seeds the initialisation, the dropout masks and the order of training sequences."""
    steps: int | None = None
    """Optimizer steps. ``None`` derives them from ``epochs``, capped by ``minutes``."""
    epochs: float = 6.0
    """Passes over the train split when ``steps`` is not given."""
    minutes: float = 20.0
    """Wall-clock cap on training when ``steps`` is not given (evaluation included), applied
    by timing a few steps."""
    vocab_size: int = 8192
    """BPE vocabulary including ``<|endoftext|>``; large enough that top-k is a real choice."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate, reached after ``warmup_steps`` and decayed by a cosine."""
    min_lr_ratio: float = 0.1
    """The learning rate at the last step, as a fraction of ``lr``."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    """AdamW decay on the matrices (not on norms)."""
    grad_clip: float = 1.0
    dropout: float = 0.2
    """Dropout on the token embeddings and on every attention and MLP output, in training only
    (forward hooks, so the saved model is a plain Llama). The corpus is small and is seen for
    many epochs: without it the teacher memorises the train split, whose cache would then hold
    near one-hot distributions."""
    eval_every: int = 100
    """Steps between two validation passes (over the whole validation split)."""
    autocast_bf16: bool = True
    """Run matmuls in bfloat16 (weights and optimizer stay float32). Fast on CPUs with
    AVX512-BF16 or AMX; pass ``--no-bf16`` elsewhere."""


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every byte is in the alphabet, so nothing is ever unknown)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def pack(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One token stream: ``<|endoftext|> doc0 <|endoftext|> doc1 ...`` as int64 ``(N,)``."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.append(eot)
        stream.extend(encoding.ids)
    return torch.tensor(stream, dtype=torch.long)


def chunks(stream: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Windows of ``seq_len + 1`` tokens (inputs and shifted targets), stride ``seq_len``:
    ``(n, seq_len + 1)``. The ragged tail is dropped."""
    usable = stream[offset:]
    n = (usable.numel() - 1) // seq_len
    return usable[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def build_model(recipe: TeacherRecipe) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def add_dropout(model: LlamaForCausalLM, p: float) -> None:
    """Residual and embedding dropout, which the transformers Llama does not have."""

    def drop(module: torch.nn.Module, args: object, output):
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def lr_at(step: int, recipe: TeacherRecipe, total: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, recipe: TeacherRecipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), fused=True)


def loss_on(model: LlamaForCausalLM, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` ``(B, T + 1)``."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, bf16: bool, batch: int = 16) -> float:
    """Token-weighted mean cross-entropy (nats) over all ``windows`` ``(n, T + 1)``."""
    model.eval()
    total = 0.0
    for i in range(0, windows.shape[0], batch):
        part = windows[i : i + batch]
        total += loss_on(model, part, bf16).item() * part.shape[0]
    model.train()
    return total / windows.shape[0]


def batches(train: torch.Tensor, recipe: TeacherRecipe, generator: torch.Generator):
    """Endless ``(B, T + 1)`` batches: every epoch shifts the window grid by a random offset
    and shuffles the windows, both drawn from ``generator``."""
    while True:
        offset = int(torch.randint(recipe.seq_len, (1,), generator=generator))
        windows = chunks(train, recipe.seq_len, offset)
        order = torch.randperm(windows.shape[0], generator=generator)
        for i in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
            yield windows[order[i : i + recipe.batch_size]]


def train_step(model, optimizer, batch, recipe: TeacherRecipe, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_on(model, batch, recipe.autocast_bf16)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def steps_for(model, train, valid, recipe: TeacherRecipe) -> int:
    """``recipe.epochs`` worth of steps, or fewer if they would not fit in ``recipe.minutes``."""
    tokens_per_step = recipe.batch_size * recipe.seq_len
    return min(
        math.ceil(recipe.epochs * train.numel() / tokens_per_step),
        calibrate_steps(model, train, valid, recipe),
    )


def calibrate_steps(model, train, valid, recipe: TeacherRecipe) -> int:
    """How many steps fit in ``recipe.minutes``, timed on a throwaway copy of the model.

    The random state is restored afterwards, so ``--steps N`` reproduces the run exactly."""
    with torch.random.fork_rng(devices=[]):
        return _time_steps(copy.deepcopy(model), train, valid, recipe)


def _time_steps(probe, train, valid, recipe: TeacherRecipe) -> int:
    optimizer = make_optimizer(probe, recipe)
    sample = chunks(train, recipe.seq_len)[: recipe.batch_size * 6]
    batch_list = list(sample.split(recipe.batch_size))
    train_step(probe, optimizer, batch_list[0], recipe, recipe.lr)  # first step warms kernels
    start = time.perf_counter()
    for batch in batch_list[1:]:
        train_step(probe, optimizer, batch, recipe, recipe.lr)
    step_s = (time.perf_counter() - start) / (len(batch_list) - 1)
    start = time.perf_counter()
    evaluate(probe, valid, recipe.autocast_bf16)
    eval_s = time.perf_counter() - start
    budget = recipe.minutes * 60.0 - 2 * eval_s  # the first and the last evaluation
    return max(1, int(budget / (step_s + eval_s / recipe.eval_every)))


def make_teacher(recipe: TeacherRecipe, out: Path) -> dict:
    """Train tokenizer and model, save both to ``out``; returns what ``TRAINING.json`` holds."""
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    docs = {split: default_corpus(split) for split in ("train", "validation")}
    tokenizer = train_tokenizer([d["text"] for d in docs["train"]], recipe.vocab_size)
    if len(tokenizer) != recipe.vocab_size:
        raise RuntimeError(
            f"the train split only supports {len(tokenizer)} BPE tokens, not "
            f"{recipe.vocab_size}: pass --vocab-size {len(tokenizer)} or less"
        )
    streams = {split: pack(tokenizer, [d["text"] for d in ds]) for split, ds in docs.items()}
    valid = chunks(streams["validation"], recipe.seq_len)
    model = build_model(recipe)
    if recipe.dropout > 0:
        add_dropout(model, recipe.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    steps = recipe.steps or steps_for(model, streams["train"], valid, recipe)
    tokens_per_step = recipe.batch_size * recipe.seq_len
    print(
        f"corpus: train {len(docs['train'])} docs {streams['train'].numel()} tokens, "
        f"validation {len(docs['validation'])} docs {streams['validation'].numel()} tokens; "
        f"model {n_params / 1e6:.2f}M params; {steps} steps of {tokens_per_step} tokens",
        flush=True,
    )

    optimizer = make_optimizer(model, recipe)
    generator = torch.Generator().manual_seed(recipe.seed)
    stream = batches(streams["train"], recipe, generator)
    init_val = evaluate(model, valid, recipe.autocast_bf16)
    curve = [{"step": 0, "tokens": 0, "train_loss": None, "val_loss": init_val}]
    print(f"step     0  val {init_val:.3f}  (log V = {math.log(recipe.vocab_size):.3f})")
    train_start = time.perf_counter()
    running: list[float] = []
    for step in range(steps):
        running.append(
            train_step(model, optimizer, next(stream), recipe, lr_at(step, recipe, steps))
        )
        if (step + 1) % recipe.eval_every == 0 or step + 1 == steps:
            val = evaluate(model, valid, recipe.autocast_bf16)
            point = {
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "train_loss": sum(running) / len(running),
                "val_loss": val,
            }
            curve.append(point)
            running.clear()
            elapsed = time.perf_counter() - train_start
            print(
                f"step {step + 1:5d}  train {point['train_loss']:.3f}  val {val:.3f}  "
                f"lr {lr_at(step, recipe, steps):.2e}  {elapsed / 60:.1f} min",
                flush=True,
            )
    train_seconds = time.perf_counter() - train_start
    final_train = evaluate(model, chunks(streams["train"], recipe.seq_len), recipe.autocast_bf16)

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "steps": steps,
        "tokens_seen": steps * tokens_per_step,
        "epochs": steps * tokens_per_step / streams["train"].numel(),
        "parameters": n_params,
        "final_train_loss": final_train,
        "final_val_loss": curve[-1]["val_loss"],
        "random_init_val_loss": init_val,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "corpus": {
            split: {
                "documents": len(ds),
                "characters": sum(len(d["text"]) for d in ds),
                "tokens": streams[split].numel(),
                "sha256": hashlib.sha256(json.dumps(ds).encode()).hexdigest(),
            }
            for split, ds in docs.items()
        },
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": sys.platform,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "loss_curve": curve,
        "reproduce": (
            f"python -m cache_builder.default.make_teacher --out {out} --seed {recipe.seed} "
            f"--steps {steps}" + ("" if recipe.autocast_bf16 else " --no-bf16")
        ),
    }
    (out / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def keep_freed_memory() -> None:
    """Stop glibc from unmapping the large per-step buffers (logits are ``(B, T, V)``).

    By default every free of a block above 32 MB goes back to the OS and the next step
    page-faults it in again: a third of the CPU time of a step on one thread. Elsewhere (other
    libcs, other systems) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def portable_tokenizer_config(out: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4 and 5 both
    resolve (5 writes ``TokenizersBackend``, unknown to 4)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=TeacherRecipe.epochs)
    parser.add_argument("--minutes", type=float, default=20.0, help="cap if --steps is unset")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (reproduces)")
    parser.add_argument("--vocab-size", type=int, default=TeacherRecipe.vocab_size)
    parser.add_argument("--no-bf16", action="store_true", help="float32 matmuls")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    recipe = TeacherRecipe(
        seed=args.seed,
        steps=args.steps,
        epochs=args.epochs,
        minutes=args.minutes,
        vocab_size=args.vocab_size,
        autocast_bf16=not args.no_bf16,
    )
    info = make_teacher(recipe, args.out)
    print(
        f"wrote {args.out}: val {info['final_val_loss']:.3f} (random init "
        f"{info['random_init_val_loss']:.3f}), train {info['final_train_loss']:.3f}, "
        f"{info['steps']} steps in {info['train_seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
