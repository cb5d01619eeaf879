"""Load and check the teacher's tokenizer, and describe it for the manifest.

A build needs a fast (Rust) tokenizer with an EOS token: every document ends with EOS so that
documents packed into one row stay separate. A pad token is only used to fill the end of a row
(those positions are never scored), so a tokenizer without one borrows EOS, as most causal LMs
are used; the returned notes say so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas.errors import KdcacheError
from schemas.fingerprint import tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenizerError", "check_tokenizer", "load_tokenizer", "tokenizer_info"]


class TokenizerError(KdcacheError, ValueError):
    """The tokenizer cannot be loaded, or lacks something a build needs (EOS, a chat template)."""


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """Load a fast tokenizer with `transformers.AutoTokenizer` and check it with `check_tokenizer`.

    Args:
        name_or_path: a hub model id or a local directory (usually the teacher's).
        revision: a hub branch, tag or commit.
        trust_remote_code: allow a tokenizer class defined in the repository.

    Returns:
        The tokenizer, and notes for the user about what was adjusted (e.g. pad set to EOS).

    Raises:
        TokenizerError: it cannot be loaded, is not a fast tokenizer, or has no EOS token.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"could not load a tokenizer from {name_or_path!r}: {e}",
            hint="pass a local directory holding tokenizer.json, or a hub model id "
            "(with network access or a populated HF cache)",
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"the tokenizer of {name_or_path!r} is a slow (Python) tokenizer "
            f"({type(tokenizer).__name__})",
            hint="use a model that ships tokenizer.json, or convert it once with "
            "transformers and save_pretrained the fast tokenizer",
        )
    return tokenizer, check_tokenizer(tokenizer)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Check that `tokenizer` has EOS and pad tokens; borrow EOS as pad when pad is missing.

    Returns:
        Notes for the user, one line each, about what was adjusted.

    Raises:
        TokenizerError: the tokenizer has no EOS token.
    """
    name = _name(tokenizer)
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"the tokenizer {name!r} has no eos_token; kdcache ends every document with EOS "
            "so that packed documents stay separate",
            hint="set one and save it: tok.eos_token = '</s>' (a token of its vocabulary); "
            "tok.save_pretrained(DIR); then pass that DIR",
        )
    notes: list[str] = []
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(
            f"tokenizer {name!r} has no pad_token; using eos_token {tokenizer.eos_token!r} "
            f"(id {tokenizer.eos_token_id}) to pad rows (padding is never scored)"
        )
    return notes


def tokenizer_info(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the manifest records about the tokenizer.

    Returns:
        name_or_path, fingerprint (`schemas.fingerprint.tokenizer_fingerprint`), vocab_size
        (`len(tokenizer)`, added tokens included), and bos/eos/pad token ids (None if absent).
    """
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
