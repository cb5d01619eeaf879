"""What the loss table stores about each loss: the function and what it needs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
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
    aux_head: bool = False
    """True when the loss trains a second lm_head passed as `aux_student=`."""

    @property
    def options(self) -> dict[str, Any]:
        params = inspect.signature(self.fn).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("stats", "aux_student")
        }
