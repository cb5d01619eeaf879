"""The public way in: distil from a kdcache cache inside the training loop you already have.

Four pieces, the same code `kdcache train` runs:
- `cache_dataset(url, ...)`: a torch `IterableDataset` of the cache's sequences (the trainer's
  `ShardStream`): shuffled by shard and buffer from a seed, split over DDP ranks and DataLoader
  workers, optionally grouped into micro-batches of about `batch_tokens` tokens.
- `KDCollator(cache)`: pads a micro-batch into `input_ids`, `attention_mask` and `labels` (the
  Hugging Face convention: unshifted, -100 on padding), plus `kd_rows` (which flat (B * L)
  positions have a next token) and `kd_teacher` (the teacher's `TeacherBatch` at those rows).
- `kd_loss(hidden, lm_head_weight, teacher, loss=...)`: a registry loss from the student's
  final hidden states and lm_head, memory-lean (per-token losses run over blocks of rows, the
  others through the vocabulary-chunked student: never [N, V] float32 logits);
  `kd_loss_from_logits` for a student whose logits are at hand. Both return the loss and the
  loss's own per-term metrics.
- `check_student(cache, tokenizer)`: the tokenizer check `kdcache train` makes, once.

A plain PyTorch loop (examples/plain_loop.py runs it):

    cache = open_cache(url)
    check_student(cache, tokenizer)
    loader = DataLoader(cache_dataset(url, batch_tokens=4096), batch_size=None,
                        collate_fn=KDCollator(cache))
    for batch in loader:
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, terms = kd_loss(out.last_hidden_state, model.lm_head.weight, batch["kd_teacher"],
                              rows=batch["kd_rows"], loss="fkl-tail")
        loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from schemas.cache import Cache, open_cache
from schemas.errors import ConfigError
from student_trainer.batch import TeacherBatch, collate
from student_trainer.dataset import Sequence, ShardStream
from student_trainer.losses import LOSSES, LossSpec, resolve_options
from student_trainer.losses._student import DenseStudent
from student_trainer.objective import LossSettings, loss_of, objective_for
from student_trainer.student import check_tokenizer

__all__ = [
    "KDCollator",
    "LossSettings",
    "TeacherBatch",
    "cache_dataset",
    "check_student",
    "kd_loss",
    "kd_loss_from_logits",
]


def cache_dataset(
    url: str,
    *,
    seed: int = 0,
    shuffle: bool = True,
    buffer_sequences: int = 1024,
    batch_tokens: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    skip_bad_shards: bool = False,
    storage_options: dict | None = None,
) -> ShardStream:
    """The cache's sequences for one epoch (set `.epoch` before each pass), as `kdcache train`
    reads them. Rank and world size default to torch.distributed's when it is initialised.

    `batch_tokens`: yield micro-batches (lists of sequences of about that many tokens) for a
    `DataLoader(batch_size=None, collate_fn=KDCollator(cache))`; None yields single sequences
    for a DataLoader that batches by count. `state_dict()`/`load_state_dict()` resume a pass.
    Rank and world size come from torch.distributed, or torchrun's environment before the
    process group exists.
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun, before the group exists
        rank = int(os.environ["RANK"]) if rank is None else rank
        world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    return ShardStream(
        url,
        seed=seed,
        shuffle=shuffle,
        buffer_sequences=buffer_sequences,
        rank=rank or 0,
        world_size=world_size or 1,
        skip_bad_shards=skip_bad_shards,
        storage_options=storage_options,
        batch_tokens=batch_tokens,
    )


class KDCollator:
    """Pads sequences (or a micro-batch: a list of them) into a dict of tensors for a student.

    Keys: `input_ids` (B, L), `attention_mask` (B, L), `labels` (B, L: the input ids, -100 on
    padding), `kd_rows` (N,) flat indices into (B * L) of the positions with a next token, and
    `kd_teacher`, the `TeacherBatch` of those N positions (move it with `.to(device)`).
    """

    def __init__(self, cache: Cache | str, **storage_options: Any) -> None:
        if isinstance(cache, str):
            cache = open_cache(cache, require_complete=True, **storage_options)
        self.vocab_size = cache.layout.vocab_size
        self.temperatures = tuple(cache.layout.temperatures)
        self.sample_temperature = cache.manifest.build.sample_temperature
        self.num_samples = cache.layout.num_samples

    def __call__(self, sequences: list[Sequence] | list[list[Sequence]]) -> dict[str, Any]:
        if sequences and isinstance(sequences[0], list):  # a DataLoader batch of micro-batches
            sequences = [s for group in sequences for s in group]
        inputs, teacher = collate(
            list(sequences),
            self.vocab_size,
            self.temperatures,
            self.sample_temperature,
            self.num_samples,
        )
        labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
        return {
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "labels": labels,
            "kd_rows": inputs.rows,
            "kd_teacher": teacher,
        }


def check_student(cache: Cache | str, tokenizer: object, *, allow_extension: bool = False) -> None:
    """Raise `IncompatibleCacheError` (the error `kdcache train` gives) unless `tokenizer` maps
    text to the ids the teacher saw; `allow_extension` accepts one that only adds tokens."""
    if isinstance(cache, str):
        cache = open_cache(cache, require_complete=True)
    check_tokenizer(tokenizer, cache, allow_extension)


def kd_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: TeacherBatch,
    loss: str = "fkl-tail",
    *,
    rows: Tensor | None = None,
    bias: Tensor | None = None,
    settings: LossSettings | None = None,
    bf16: bool | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, float]]:
    """The distillation loss of a student given as hidden states and its lm_head.

    `hidden` is (N, d) at the teacher's N positions, or (B, L, d) with `rows` (the collator's
    `kd_rows`) picking them. `options` are the loss's own (`kdcache train --help` lists them);
    `settings` adds a temperature, CE or z-loss term and the memory knobs. `bf16` (None: whether
    CUDA autocast to bf16 is on) runs the lm_head products in bf16 as `kdcache train` does.
    Returns the scalar loss and the loss's metrics (e.g. approximation errors) as floats.
    """
    spec, resolved = _spec(loss, options)
    if hidden.ndim == 3:
        if rows is None:
            raise ConfigError(
                "kd_loss: hidden of shape (B, L, d) needs rows= (the collator's kd_rows)"
            )
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    if hidden.shape[0] != teacher.labels.shape[0]:
        raise ConfigError(
            f"kd_loss: {hidden.shape[0]} student positions for {teacher.labels.shape[0]} teacher "
            "positions; pass the hidden states of the collator's kd_rows"
        )
    if bf16 is None:
        bf16 = (
            hidden.is_cuda
            and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.bfloat16
        )
    stats: dict[str, Tensor] = {}
    objective = objective_for(spec, resolved, settings or LossSettings(), teacher, stats, bf16)
    with torch.autocast(hidden.device.type, enabled=False):  # as `HiddenAndHead` calls it
        hidden = hidden.to(torch.promote_types(hidden.dtype, lm_head_weight.dtype))
        value = objective(hidden, lm_head_weight, bias, None)
    return value, {k: float(v) for k, v in stats.items()}


def kd_loss_from_logits(
    logits: Tensor,
    teacher: TeacherBatch,
    loss: str = "fkl-tail",
    *,
    rows: Tensor | None = None,
    settings: LossSettings | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, float]]:
    """`kd_loss` for a student whose logits (N, V), or (B, L, V) with `rows`, are at hand."""
    spec, resolved = _spec(loss, options)
    if logits.ndim == 3:
        if rows is None:
            raise ConfigError("kd_loss_from_logits: logits (B, L, V) need rows= (kd_rows)")
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
    stats: dict[str, Tensor] = {}
    value = loss_of(
        spec, resolved, settings or LossSettings(), DenseStudent(logits), teacher, None, stats
    )
    return value, {k: float(v) for k, v in stats.items()}


def _spec(loss: str, options: dict[str, Any]) -> tuple[LossSpec, dict[str, Any]]:
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; valid losses: {', '.join(sorted(LOSSES))}")
    spec = LOSSES[loss]
    if spec.aux_head:
        raise ConfigError(
            f"loss {loss} trains an auxiliary head beside the student's, which kd_loss does not "
            f"own; train it with `kdcache train --loss {loss}`"
        )
    return spec, resolve_options(loss, options)
