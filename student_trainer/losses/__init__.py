"""The loss table: every distillation loss kdcache trains with, by the name users type.

Each module defines its losses as pure functions and their `SPECS`; this table merges them, so
each name is written once. `kdcache train --loss NAME` offers `sorted(LOSSES)`.
"""

from __future__ import annotations

from typing import Any

from schemas.errors import ConfigError
from student_trainer.losses import bild, csd, dkd, dual_head, gld, hybrid, kl, pld, sampled, zloss
from student_trainer.losses._registry import LossFn, LossSpec

LOSSES: dict[str, LossSpec] = {
    **kl.SPECS,
    **sampled.SPECS,
    **hybrid.SPECS,
    **bild.SPECS,
    **csd.SPECS,
    **pld.SPECS,
    **dkd.SPECS,
    **gld.SPECS,
    **dual_head.SPECS,
    **zloss.SPECS,
}

__all__ = ["LOSSES", "LossFn", "LossSpec", "parse_option", "resolve_options"]


def resolve_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` options for loss `name`, each converted to the type of its default.

    Raises ConfigError naming the loss's valid options when one is not among them.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    valid = LOSSES[name].options
    out = {}
    for key, value in given.items():
        if key not in valid:
            listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
            raise ConfigError(f"loss {name} takes no option {key!r}; its options: {listing}")
        out[key] = parse_option(key, value, valid[key])
    return out


def parse_option(key: str, value: Any, default: Any) -> Any:
    """Convert a `--loss-option key=value` string to the type of the option's default."""
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ConfigError(
            f"--loss-option {key}={value}: expected a {type(default).__name__}"
        ) from None
    return value
