"""`TrainConfig`: every setting of `kdcache train`, typed, documented and checked once.

Saved next to the student as `train_config.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    cache: str
    """--cache: the teacher cache to learn from (local directory or fsspec URL)."""
    out: str
    """--out: directory for the trained student, checkpoints, metrics and the loss curve."""
    student: str | None = None
    """--student: a Hugging Face causal LM to start from (directory or hub id)."""
    student_config: str | None = None
    """--student-config: a JSON model config to initialise a fresh student (default: the embedded small student)."""
    tokenizer: str | None = None
    """--tokenizer: the student's tokenizer (default: the student's own, else the cache's copy)."""
    allow_vocab_extension: bool = False
    """--allow-vocab-extension: accept a student vocabulary that extends the teacher's."""
    loss: str = "fkl"
    """--loss: the distillation loss, by registry name."""
    loss_options: dict[str, Any] = field(default_factory=dict)
    """--loss-option key=value: knobs of the chosen loss (see --help for each loss's options)."""
    ce_weight: float = 0.0
    """--ce-weight: weight of next-token cross-entropy mixed into the loss."""
    temperature: float | None = None
    """--temperature: distillation temperature (default: the loss's own; exact tails at T != 1 need it stored at build time with --temperatures)."""
    z_loss: float = 0.0
    """--z-loss: coefficient of the PaLM z-loss c * lse^2 (0 disables)."""
    lr: float = 1e-3
    """--lr: peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """--weight-decay: AdamW weight decay."""
    warmup_steps: int = 20
    """--warmup-steps: linear warm-up before the cosine decay."""
    max_steps: int | None = None
    """--max-steps: optimizer steps to run (default: --epochs over the cache)."""
    epochs: float = 1.0
    """--epochs: passes over the cache when --max-steps is not given."""
    batch_tokens: int = 8192
    """--batch-tokens: tokens per micro-batch."""
    grad_accum: int = 1
    """--grad-accum: micro-batches per optimizer step."""
    clip: float = 1.0
    """--clip: gradient-norm clipping (0 disables)."""
    seed: int = 0
    """--seed: seeds the model initialisation and the data order."""
    shuffle_buffer: int = 1024
    """--shuffle-buffer: sequences held for shuffling within and across shards (0: shard order only)."""
    num_workers: int = 0
    """--num-workers: DataLoader worker processes decoding shards."""
    checkpoint_every: int = 0
    """--checkpoint-every: save a resumable checkpoint every N steps (0: only at the end)."""
    resume: bool = False
    """--resume: continue from the checkpoint in --out, exactly where it stopped."""
    eval_cache: str | None = None
    """--eval-cache: a held-out cache for student CE, KL to the teacher's top-k and top-1 agreement."""
    eval_every: int = 0
    """--eval-every: evaluate every N steps (0: only at the end when --eval-cache is given)."""
    eval_tokens: int = 65536
    """--eval-tokens: at most this many held-out tokens per evaluation."""
    device: str = "auto"
    """--device: auto (cuda when available), cpu, cuda, cuda:1, ..."""
    bf16: bool | None = None
    """--bf16/--no-bf16: bf16 autocast (default: on for CUDA, off on CPU)."""
    fsdp: bool = False
    """--fsdp: under torchrun, shard the student's parameters, gradients and optimizer state over
    the ranks with FSDP (per decoder layer) instead of replicating it with DDP; for students
    that do not fit one device. Ignored in a single process."""
    skip_bad_shards: bool = False
    """--skip-bad-shards: skip (and count) bad shards instead of stopping: missing, failing their
    checksum, metadata that disagrees with the manifest, or records that fail the content
    checks (`schemas.checks.check_records`)."""
    logit_block: int = 1 << 24
    """--logit-block: the most student logits (rows x vocabulary) a per-token loss holds at
    once: it runs over blocks of logit_block // V rows, taking each block's gradient as it goes."""
    vocab_chunk: int = 8192
    """Vocabulary columns per step of the chunked student (evaluation, losses across rows)."""
    progress: bool = True
    """--progress/--no-progress: progress bar with loss, tokens/s and ETA."""
    log_every: int = 10
    """--log-every: steps between metric lines."""
    save_model: bool = True
    """--save-model/--no-save-model: save the final student with save_pretrained."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for --cache and --eval-cache."""

    def __post_init__(self) -> None:
        checks = [
            (
                self.student is None or self.student_config is None,
                "give --student or --student-config, not both",
            ),
            (self.lr > 0, "--lr must be > 0"),
            (self.temperature is None or self.temperature > 0, "--temperature must be > 0"),
            (self.ce_weight >= 0, "--ce-weight must be >= 0"),
            (self.z_loss >= 0, "--z-loss must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.batch_tokens >= 2, "--batch-tokens must be at least 2"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.clip >= 0, "--clip must be >= 0"),
            (self.logit_block >= 1, "--logit-block must be at least 1"),
            (self.shuffle_buffer >= 0, "--shuffle-buffer must be >= 0"),
            (self.num_workers >= 0, "--num-workers must be >= 0"),
            (
                self.checkpoint_every >= 0 and self.eval_every >= 0,
                "--checkpoint-every and --eval-every must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("storage_options")
        return data
