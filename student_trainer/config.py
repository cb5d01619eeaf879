"""`TrainConfig`: every setting of `kdcache train`, typed, documented and checked once.

Saved, as the run resolved it (device, bf16, typed loss options), next to the student as
`train_config.json` and inside every checkpoint, where `--resume` compares it with the new
command's.

Each field says what `--resume` may do with it. `MUST_MATCH`: it changes what is trained (the
data and its order, the student, the loss, the schedule, the numerics) or what the recorded
evaluations measure; a resume that changes it would silently train another run, so it is
refused. `MAY_CHANGE`: where the run writes, how often it reports, where it runs. `classified`
refuses, at import, a field that says neither: a new setting cannot slip past the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar

from schemas.errors import ConfigError

RESUME = "resume"
"""The field-metadata key that classifies a setting for `--resume`."""
MUST_MATCH: Mapping[str, str] = MappingProxyType({RESUME: "must match"})
MAY_CHANGE: Mapping[str, str] = MappingProxyType({RESUME: "may change"})
_CLASSES = (MUST_MATCH[RESUME], MAY_CHANGE[RESUME])
_FLAGS = {
    "loss_options": "--loss-option",
    "storage_options": "--storage-option",
    "world_size": "ranks (torchrun processes)",
}
"""Settings whose name on the command line is not `--` + the field name with dashes."""

C = TypeVar("C")


def classified(cls: type[C]) -> type[C]:
    """Class decorator: refuse a config dataclass with a field that is neither `MUST_MATCH` nor
    `MAY_CHANGE`, naming it (a TypeError when the module is imported)."""
    unclassified = [f.name for f in fields(cls) if f.metadata.get(RESUME) not in _CLASSES]  # type: ignore[arg-type]
    if unclassified:
        raise TypeError(
            f"{cls.__name__}: {', '.join(unclassified)} must say what --resume may do with it: "
            "add metadata=MUST_MATCH or metadata=MAY_CHANGE to its field()"
        )
    return cls


@classified
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    cache: str = field(metadata=MUST_MATCH)
    """--cache: the teacher cache to learn from (local directory or fsspec URL)."""
    out: str = field(metadata=MAY_CHANGE)
    """--out: directory for the trained student, checkpoints, metrics and the loss curve."""
    student: str | None = field(default=None, metadata=MUST_MATCH)
    """--student: a Hugging Face causal LM to start from (directory or hub id)."""
    student_config: str | None = field(default=None, metadata=MUST_MATCH)
    """--student-config: a JSON model config to initialise a fresh student (default: the embedded small student)."""
    tokenizer: str | None = field(default=None, metadata=MUST_MATCH)
    """--tokenizer: the student's tokenizer (default: the student's own, else the cache's copy)."""
    allow_vocab_extension: bool = field(default=False, metadata=MAY_CHANGE)
    """--allow-vocab-extension: accept a student vocabulary that extends the teacher's."""
    loss: str = field(default="fkl", metadata=MUST_MATCH)
    """--loss: the distillation loss, by registry name."""
    loss_options: dict[str, Any] = field(default_factory=dict, metadata=MUST_MATCH)
    """--loss-option key=value: knobs of the chosen loss (see --help for each loss's options)."""
    ce_weight: float = field(default=0.0, metadata=MUST_MATCH)
    """--ce-weight: weight of next-token cross-entropy mixed into the loss."""
    temperature: float | None = field(default=None, metadata=MUST_MATCH)
    """--temperature: distillation temperature (default: the loss's own; exact tails at T != 1 need it stored at build time with --temperatures)."""
    strict_temperature: bool = field(default=False, metadata=MAY_CHANGE)
    """--strict-temperature: refuse a temperature whose teacher lse the cache did not store
    (its tail terms would be approximate) instead of warning once."""
    z_loss: float = field(default=0.0, metadata=MUST_MATCH)
    """--z-loss: coefficient of the PaLM z-loss c * lse^2 (0 disables)."""
    lr: float = field(default=1e-3, metadata=MUST_MATCH)
    """--lr: peak learning rate of AdamW."""
    weight_decay: float = field(default=0.01, metadata=MUST_MATCH)
    """--weight-decay: AdamW weight decay."""
    warmup_steps: int = field(default=20, metadata=MUST_MATCH)
    """--warmup-steps: linear warm-up before the cosine decay."""
    max_steps: int | None = field(default=None, metadata=MUST_MATCH)
    """--max-steps: optimizer steps to run (default: --epochs over the cache)."""
    epochs: float = field(default=1.0, metadata=MUST_MATCH)
    """--epochs: passes over the cache when --max-steps is not given."""
    batch_tokens: int = field(default=8192, metadata=MUST_MATCH)
    """--batch-tokens: tokens per micro-batch."""
    grad_accum: int = field(default=1, metadata=MUST_MATCH)
    """--grad-accum: micro-batches per optimizer step."""
    clip: float = field(default=1.0, metadata=MUST_MATCH)
    """--clip: gradient-norm clipping (0 disables)."""
    seed: int = field(default=0, metadata=MUST_MATCH)
    """--seed: seeds the model initialisation and the data order."""
    shuffle_buffer: int = field(default=1024, metadata=MUST_MATCH)
    """--shuffle-buffer: sequences held for shuffling within and across shards (0: shard order only)."""
    num_workers: int = field(default=0, metadata=MUST_MATCH)
    """--num-workers: DataLoader worker processes decoding shards. Part of the data order: each
    worker reads its own shards and the loader interleaves them (0 and 1 read the same order)."""
    checkpoint_every: int = field(default=0, metadata=MAY_CHANGE)
    """--checkpoint-every: save a resumable checkpoint every N steps (0: only at the end)."""
    resume: bool = field(default=False, metadata=MAY_CHANGE)
    """--resume: continue from the checkpoint in --out, exactly where it stopped; the outputs
    (metrics.jsonl, result.json, the student) are those of a run that never stopped."""
    eval_cache: str | None = field(default=None, metadata=MUST_MATCH)
    """--eval-cache: a held-out cache for student CE, KL to the teacher's top-k and top-1 agreement."""
    eval_every: int = field(default=0, metadata=MAY_CHANGE)
    """--eval-every: evaluate every N steps (0: only at the end when --eval-cache is given)."""
    eval_tokens: int = field(default=65536, metadata=MUST_MATCH)
    """--eval-tokens: at most this many held-out tokens per evaluation (what the eval curve
    measures, so it stays across a resume like the eval cache)."""
    device: str = field(default="auto", metadata=MAY_CHANGE)
    """--device: auto (cuda when available), cpu, cuda, cuda:1, ..."""
    bf16: bool | None = field(default=None, metadata=MUST_MATCH)
    """--bf16/--no-bf16: bf16 autocast (default: on for CUDA, off on CPU; recorded resolved)."""
    fsdp: bool = field(default=False, metadata=MUST_MATCH)
    """--fsdp: under torchrun, shard the student's parameters, gradients and optimizer state over
    the ranks with FSDP (per decoder layer) instead of replicating it with DDP; for students
    that do not fit one device. Ignored in a single process."""
    skip_bad_shards: bool = field(default=False, metadata=MAY_CHANGE)
    """--skip-bad-shards: skip (and count) bad shards instead of stopping: missing, failing their
    checksum, metadata that disagrees with the manifest, or records that fail the content
    checks (`schemas.checks.check_records`)."""
    logit_block: int = field(default=1 << 24, metadata=MUST_MATCH)
    """--logit-block: the most student logits (rows x vocabulary) a per-token loss holds at
    once: it runs over blocks of logit_block // V rows, taking each block's gradient as it goes. Other blocks sum in another order (the same loss,
    other rounding), so it stays across a resume."""
    vocab_chunk: int = field(default=8192, metadata=MUST_MATCH)
    """Vocabulary columns per step of the chunked student (evaluation, losses across rows)."""
    progress: bool = field(default=True, metadata=MAY_CHANGE)
    """--progress/--no-progress: progress bar with loss, tokens/s and ETA."""
    log_every: int = field(default=10, metadata=MAY_CHANGE)
    """--log-every: steps between metric lines."""
    save_model: bool = field(default=True, metadata=MAY_CHANGE)
    """--save-model/--no-save-model: save the final student with save_pretrained."""
    storage_options: dict[str, Any] = field(default_factory=dict, metadata=MAY_CHANGE)
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


def flag(name: str) -> str:
    """The command-line name of setting `name` (a `TrainConfig` field or `world_size`)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def trained_settings(
    cfg: TrainConfig, *, cache: str, eval_cache: str | None, world: int
) -> dict[str, Any]:
    """What `--resume` holds fixed, by name: `cfg`'s `MUST_MATCH` fields (pass it resolved),
    the caches as their manifest fingerprints `cache` and `eval_cache` (a moved copy is the
    same cache, another cache at the same URL is not), and `world_size`, the number of ranks,
    which decides what each rank reads and how many tokens make a step."""
    settings = {
        f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata[RESUME] == _CLASSES[0]
    }
    settings.update(cache=cache, eval_cache=eval_cache, world_size=world)
    settings["num_workers"] = max(1, cfg.num_workers)  # no worker reads as one worker does
    return settings


def changed_settings(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_config: Mapping[str, Any],
    new_config: Mapping[str, Any],
) -> list[str]:
    """`--flag old -> new` for each setting of `old` (`trained_settings`) that `new` changes,
    shown as the configs give it (a cache as its URL and fingerprint). A setting `old` lacks
    (a checkpoint from before it existed) is not compared."""
    out = []
    for name, before in old.items():
        if name in new and new[name] != before:
            was, now = _shown(name, before, old_config), _shown(name, new[name], new_config)
            out.append(f"{flag(name)} {was} -> {now}")
    return out


def _shown(name: str, setting: Any, config: Mapping[str, Any]) -> str:
    value = config.get(name, setting)
    if name in ("cache", "eval_cache") and setting is not None:
        return f"{value} (fingerprint {str(setting)[:19]})"
    if value is None or value == {}:
        return "unset"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)
