"""Hugging Face `Trainer` distilling from a kdcache cache: `KDTrainer`.

Three lines change in an existing Trainer script: the dataset (`cache_dataset`), the collator
(`KDCollator`), and the class (`KDTrainer` with the loss's name):

    trainer = KDTrainer(model=student, args=args, kd_loss="fkl-tail",
                        train_dataset=cache_dataset(url, batch_tokens=8192),
                        data_collator=KDCollator(url))

`compute_loss` runs the student's own forward (through whatever wraps it: DDP, accelerate)
with `logits_to_keep=1`, so no [B, L, V] logits are made, takes the final hidden states from
the base model, and calls `kd_loss` with the lm_head: the code `kdcache train` runs. The loss's
terms are averaged over each logging interval into the Trainer's logs (`kd_loss`, and e.g.
`approx/...` where a loss measures an approximation). The Trainer's own gradient accumulation,
bf16 autocast, clipping, checkpoints and logging apply unchanged. The dataset yields whole
micro-batches of about `batch_tokens` tokens, already split over ranks by shard, so the train
dataloader is the stream itself (per_device_train_batch_size does not apply), and
`TrainingArguments` must keep `remove_unused_columns=False` (`kd_training_arguments` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from student_trainer.api import LossSettings, kd_loss
from student_trainer.losses import LOSSES

__all__ = ["KDTrainer", "kd_training_arguments"]


def kd_training_arguments(**kwargs: Any) -> TrainingArguments:
    """`TrainingArguments(**kwargs)` keeping the collator's keys (they are not the model's
    arguments, and the Trainer would drop them)."""
    kwargs.setdefault("remove_unused_columns", False)
    return TrainingArguments(**kwargs)


class KDTrainer(Trainer):
    """A `transformers.Trainer` whose loss is a kdcache distillation loss.

    `kd_loss`: a loss of the registry (`kdcache train --help` lists them); `kd_options`: its
    options; `kd_settings`: temperature, added CE / z-loss terms, memory knobs.
    """

    def __init__(
        self,
        *args: Any,
        kd_loss: str = "fkl-tail",
        kd_options: dict[str, Any] | None = None,
        kd_settings: LossSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kd_loss_name = kd_loss
        self.kd_options = dict(kd_options or {})
        self.kd_settings = kd_settings or LossSettings()
        self._kd_terms: dict[str, list[float]] = {}
        self.kd_losses: list[float] = []
        """The loss of every micro-batch, in order (before the Trainer's scaling)."""
        # The loss is a mean over each micro-batch's positions, as `kdcache train` takes it: the
        # Trainer divides it by the accumulation steps (it would not for a model's own loss
        # normalised by the whole step's token count).
        self.loss_is_scaled_for_ga = False

    def get_train_dataloader(self) -> DataLoader:
        """The stream's own micro-batches, collated: the dataset already splits the cache over
        ranks and workers by shard, so the accelerator neither batches nor shards it again."""
        return DataLoader(
            self.train_dataset,
            batch_size=None,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        teacher, rows = inputs["kd_teacher"], inputs["kd_rows"]
        unwrapped = self.accelerator.unwrap_model(model)
        seen: dict[str, torch.Tensor] = {}

        def keep(_module: Any, _args: Any, out: Any) -> None:
            seen["hidden"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

        hook = unwrapped.base_model.register_forward_hook(keep)
        try:  # through the wrapper (DDP's hooks), and without the [B, L, V] logits
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                logits_to_keep=1,
                use_cache=False,
            )
        finally:
            hook.remove()
        head = unwrapped.get_output_embeddings()
        device = seen["hidden"].device
        settings = self.kd_settings
        if LOSSES[self.kd_loss_name].scheduled:  # DKD's warm-up, dual-head's KD stop
            settings = dataclasses.replace(settings, epoch=float(self.state.epoch or 0.0))
        loss, terms = kd_loss(
            seen["hidden"],
            head.weight,
            teacher.to(device),
            self.kd_loss_name,
            rows=rows.to(device),
            bias=head.bias,
            settings=settings,
            **self.kd_options,
        )
        value = float(loss.detach())  # deliberate sync, once per micro-batch, for the logs
        self.kd_losses.append(value)
        for key, item in {"kd_loss": value, **terms}.items():
            self._kd_terms.setdefault(key, []).append(item)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._kd_terms and "loss" in logs:  # training logs: the interval's mean of each term
            for key, values in self._kd_terms.items():
                logs[key] = sum(values) / len(values)
            self._kd_terms = {}
        super().log(logs, *args, **kwargs)
