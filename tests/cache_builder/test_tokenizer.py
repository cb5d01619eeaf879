"""cache_builder.tokenizer: load a fast tokenizer, borrow EOS as pad, refuse one without EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from cache_builder.tokenizer import TokenizerError, check_tokenizer, load_tokenizer, tokenizer_info
from schemas.errors import KdcacheError
from schemas.fingerprint import tokenizer_fingerprint
from tests.fixtures.models import EOS, make_tokenizer


def save_tokenizer(path: Path, **special: str) -> Path:
    backend = Tokenizer.from_str(make_tokenizer(384).backend_tokenizer.to_str())
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(path)
    return path


def test_load_local_tokenizer(local_tokenizer_dir: Path) -> None:
    tok, notes = load_tokenizer(str(local_tokenizer_dir))
    assert tok.is_fast and notes == []
    info = tokenizer_info(tok)
    assert info == {
        "name_or_path": str(local_tokenizer_dir),
        "fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": 384,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    assert info["fingerprint"].startswith("sha256:")


def test_missing_pad_borrows_eos_and_says_so(tmp_path: Path) -> None:
    path = save_tokenizer(tmp_path / "no-pad", eos_token=EOS)
    tok, notes = load_tokenizer(str(path))
    assert tok.pad_token_id == tok.eos_token_id == 0
    assert len(notes) == 1 and "no pad_token" in notes[0] and EOS in notes[0]
    assert check_tokenizer(tok) == []  # idempotent


def test_missing_eos_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = save_tokenizer(tmp_path / "no-eos")
    with pytest.raises(TokenizerError, match=r"no eos_token.*Fix: set one.*eos_token") as err:
        load_tokenizer(str(path))
    assert isinstance(err.value, ValueError) and isinstance(err.value, KdcacheError)


def test_unloadable_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"could not load a tokenizer from .*nothing-here"):
        load_tokenizer(str(tmp_path / "nothing-here"))
