"""Loading the student and checking it can learn from the cache (same tokenizer, enough vocab)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from schemas.cache import TOKENIZER_DIR, Cache
from schemas.errors import CacheCorruptError, ConfigError, IncompatibleCacheError, KdcacheError
from schemas.fingerprint import tokenizer_fingerprint, vocab_extends
from schemas.storage import shown
from schemas.validate import tokenizer_problems
from student_trainer.config import TrainConfig

T = TypeVar("T")


def load_student(cfg: TrainConfig, cache: Cache) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, description) for the student `cfg` names, checked against `cache`.

    Whatever fails to load (a truncated file, a config transformers does not know, missing
    weights) is one `ConfigError` naming the option and the path, never the library's traceback.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok_option = "--tokenizer"
    if cfg.student is not None:
        path = cfg.student
        if not Path(path).exists() and "/" not in path:
            raise ConfigError(
                f"--student {path!r} is neither a directory nor a hub id",
                hint="point it at a save_pretrained directory",
            )
        model = _loaded(
            "--student",
            path,
            lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            "point --student at a directory written by save_pretrained (config.json and the weights)",
        )
        tok_source = cfg.tokenizer or path
        tok_option = "--tokenizer" if cfg.tokenizer else "--student"
        what = f"student {path}"
    else:
        config_path = cfg.student_config or str(_default_student_config())
        try:
            data = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"--student-config {config_path}: cannot read a JSON config ({exc})"
            ) from None

        def fresh() -> nn.Module:
            config = AutoConfig.for_model(**data)
            torch.manual_seed(cfg.seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

        model = _loaded(
            "--student-config",
            config_path,
            fresh,
            'give a JSON object of a transformers model config: "model_type" (e.g. "llama") '
            "and that model's fields",
        )
        tok_source = cfg.tokenizer
        what = f"fresh student from {config_path}" + (
            " (the embedded default)" if cfg.student_config is None else ""
        )
        if tok_source is None and not cache.has_tokenizer():
            raise ConfigError(
                "the cache holds no tokenizer copy and no --tokenizer was given",
                hint="pass --tokenizer PATH",
            )
    if tok_source is None:
        tokenizer = cache_tokenizer(cache)
    else:
        source = tok_source
        tokenizer = _loaded(
            tok_option,
            source,
            lambda: AutoTokenizer.from_pretrained(source),
            "point --tokenizer at a directory written by save_pretrained (tokenizer.json or "
            "the slow tokenizer's files) with the teacher's tokenizer",
        )
    check_tokenizer(tokenizer, cache, cfg.allow_vocab_extension)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < cache.layout.vocab_size:
        raise IncompatibleCacheError(
            f"the student's output vocabulary ({vocab}) is smaller than the teacher's ({cache.layout.vocab_size}) in {cache.url}",
            hint="resize the student's embeddings (model.resize_token_embeddings) to at least the teacher's size",
        )
    return model, tokenizer, what


def cache_tokenizer(cache: Cache) -> object:
    """The tokenizer from the cache's copy. A copy that cannot be loaded (even one whose
    manifest checksums were forged to match) is a `CacheCorruptError` naming the file at fault
    when `kdcache validate --deep` would name one, else the folder."""
    from transformers import AutoTokenizer

    with cache.tokenizer_files() as folder:  # checked against the manifest, then removed
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # transformers and tokenizers raise anything on a bad file
            failure = f"cannot be loaded ({_brief(exc)})"
    blamed = tokenizer_problems(cache)
    where, what = (blamed[0].where, blamed[0].what) if blamed else (f"{TOKENIZER_DIR}/", failure)
    raise CacheCorruptError(
        f"the cache's tokenizer copy {shown(cache.url)}/{where} {what}",
        hint="pass --tokenizer PATH (the teacher's tokenizer) to train without the copy",
    )


def _loaded(option: str, path: str, load: Callable[[], T], fix: str) -> T:
    """`load()`; whatever the library raises becomes one `ConfigError` naming `option`, `path`
    and the `fix` (the exception stays chained for a library user)."""
    try:
        return load()
    except KdcacheError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, its own ...
        raise ConfigError(f"{option} {path}: cannot be loaded ({_brief(exc)})", hint=fix) from exc


def _brief(exc: BaseException) -> str:
    """The exception's type and the first line of its message, cut to 200 characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def check_tokenizer(tokenizer: object, cache: Cache, allow_extension: bool) -> None:
    """Refuse a student whose tokenizer maps text to other ids than the teacher's did."""
    expected = cache.manifest.tokenizer
    got = tokenizer_fingerprint(tokenizer)  # type: ignore[arg-type]
    if got == expected.fingerprint:
        return
    if allow_extension and cache.has_tokenizer():
        base = cache_tokenizer(cache)
        if vocab_extends(base.get_vocab(), tokenizer.get_vocab()):  # type: ignore[attr-defined]
            return
    raise IncompatibleCacheError(
        f"the student's tokenizer ({getattr(tokenizer, 'name_or_path', '?')}, {got[:19]}) differs from the "
        f"cache's ({expected.name_or_path}, {expected.fingerprint[:19]})",
        hint="use a student with the teacher's tokenizer, or --allow-vocab-extension if it only adds tokens",
    )


def _default_student_config() -> Path:
    from student_trainer.default import DEFAULT_STUDENT_CONFIG

    return DEFAULT_STUDENT_CONFIG


Objective = Callable[[Tensor, Tensor, Tensor | None, Tensor | None], T]
"""What the step asks of the student: `objective(h (N, d), weight (V, d), bias (V,) | None,
aux_weight (V, d) | None)`, usually the loss."""


class HiddenAndHead(nn.Module):
    """The student as the losses need it: final hidden states and the lm_head, not logits.

    With an `objective`, forward returns `objective(h, weight, bias, aux)`: the loss is computed
    inside forward, the call that DDP and FSDP wrap. Under FSDP the lm_head is whole only between
    the root's all-gather before forward and its reshard after backward (elsewhere `head.weight`
    is this rank's DTensor shard), and computing the loss inside forward keeps every use of it in
    that window, whatever FSDP's resharding policy. The logits are still never materialised: the
    objective receives the hidden states and the head, not logits.

    Without an objective, forward returns `(h, weight, bias, aux)` as before (one process or DDP
    only; the benchmarks call it that way).
    """

    def __init__(self, model: nn.Module, aux_head: bool = False) -> None:
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        self.aux = nn.Linear(head.in_features, head.out_features, bias=False) if aux_head else None
        if self.aux is not None:
            with torch.no_grad():
                self.aux.weight.copy_(head.weight)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        rows: Tensor,
        objective: Objective[T] | None = None,
    ) -> T | tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, L, d)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, d)
        head = self.model.get_output_embeddings()
        aux = None if self.aux is None else self.aux.weight
        if objective is None:
            return h, head.weight, head.bias, aux
        # The objective starts outside bf16 autocast: the vocabulary-chunked student's backward
        # recomputes its logits without autocast, so its forward must not use it either. The
        # row-block path (per-token losses) turns autocast back on for its lm_head products,
        # whose gradients it takes in the same forward. The body may hand back bf16 states.
        with torch.autocast(h.device.type, enabled=False):
            h = h.to(torch.promote_types(h.dtype, head.weight.dtype))
            return objective(h, head.weight, head.bias, aux)
