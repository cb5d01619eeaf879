"""Fingerprints that tell whether two caches (or a cache and a student) are compatible.

No deep-learning imports: a tokenizer is read through the duck-typed methods every Hugging Face
tokenizer has, so `schemas` can fingerprint one without importing transformers.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np


class TokenizerLike(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """A hash of the vocabulary (token -> id) and the special tokens.

    Two tokenizers with the same fingerprint map every string to the same ids, which is what a
    student needs to learn from a cache.
    """
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    added = sorted(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []))
    return _digest(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": special, "added": added}
    )


def vocab_extends(base: dict[str, int], extended: dict[str, int]) -> bool:
    """True when `extended` keeps every token of `base` at the same id (it may add more)."""
    return all(extended.get(tok) == idx for tok, idx in base.items())


class StreamHasher:
    """A running hash of a token stream: windows of documents in order, with where each came from.

    Two builds that saw the same documents, tokenised and windowed the same way, in the same
    order, get the same dataset fingerprint whatever the files were called.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.num_documents = 0
        self.num_tokens = 0

    def update(self, source_row: int, token_ids: Iterable[int], source_start: int = 0) -> None:
        """Add one window: tokens `source_start:` of document `source_row`."""
        ids = np.asarray(token_ids if isinstance(token_ids, np.ndarray) else list(token_ids))
        self._h.update(struct.pack("<qqq", source_row, source_start, ids.size))
        self._h.update(ids.astype("<i8").tobytes())
        self.num_documents += source_start == 0
        self.num_tokens += int(ids.size)

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def config_fingerprint(settings: dict[str, Any]) -> str:
    """A hash of the settings that decide a cache's content (not where or how fast it was made)."""
    return _digest(settings)
