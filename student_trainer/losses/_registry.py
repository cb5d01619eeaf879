"""What the loss table stores about each loss: the function and what it needs."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: `fn(student, teacher, *, option=default, ..., stats=None) -> scalar`.

    The options a user may set with `--loss-option key=value` are the keyword-only parameters
    of `fn` (minus `stats`), so each option and its default is written once, in the signature.
    """

    fn: LossFn
    summary: str
    """One line for `kdcache train --help`, including where the cache makes it approximate."""
    needs_samples: bool = False
    """True when the loss reads sampled ids (a cache built with `--samples N`)."""
    sample_temperature: float | None = None
    """The temperature the samples must have been drawn at (None: any)."""
    reads_topk: bool = True
    """False when the loss works on a samples-only cache (`kdcache build --top-k 0`)."""
    tail_at_temperature: bool = False
    """True when the loss needs the teacher's lse of logits / T at its temperature T: exact
    where the build stored it (`--temperatures`), approximate elsewhere (the per-step error is
    in its stats). False for losses exact at any T (fkl) or used only at T = 1."""
    aux_head: bool = False
    """True when the loss trains a second lm_head passed as `aux_student=`."""
    per_token: bool = True
    """True when the loss is a mean over positions of a term that reads only its own position;
    the trainer then runs it on dense blocks of rows (`row_blocked_loss`), else it runs once on
    the whole micro-batch through the vocabulary-chunked student."""
    ce_option: str | None = None
    """The option that weights a next-token cross-entropy the loss already adds (its paper's
    task term), or None when it adds none. A trainer-side CE weight would count it twice."""

    def __post_init__(self) -> None:
        if self.ce_option is not None and self.ce_option not in self.options:
            raise ValueError(f"ce_option {self.ce_option!r} is not an option of {self.fn.__name__}")

    @property
    def options(self) -> dict[str, Any]:
        params = inspect.signature(self.fn).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.name not in ("stats", "aux_student", "epoch")
        }

    @property
    def scheduled(self) -> bool:
        """Whether the loss takes `epoch=` (epochs of training done, a float) for a schedule
        of its weights; the trainer passes it."""
        return "epoch" in inspect.signature(self.fn).parameters

    def builtin_ce(self, options: Mapping[str, Any]) -> float:
        """Weight of the label cross-entropy the loss adds itself under `options` (0.0: none).

        `options` are the user's resolved `--loss-option`s; a missing one takes its default.
        """
        if self.ce_option is None:
            return 0.0
        return float(options.get(self.ce_option, self.options[self.ce_option]))
