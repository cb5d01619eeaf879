"""The default student: a Llama small enough to train from a cache on a laptop CPU.

``student_config.json`` matches the tokenizer of the default teacher (``cache_builder.default``):
vocabulary of 8192 byte-level BPE tokens, ``<|endoftext|>`` (id 0) as bos, eos and pad. It is a
plain transformers config (``"model_type": "llama"``), so either of these loads it::

    config = transformers.AutoConfig.for_model(**json.loads(DEFAULT_STUDENT_CONFIG.read_text()))
    model = transformers.AutoModelForCausalLM.from_config(config)

About 1.4M parameters (1.05M of them in the tied embedding): hidden 128, 2 layers, 4 heads
with 2 key-value heads, MLP 344.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_STUDENT_CONFIG"]

DEFAULT_STUDENT_CONFIG: Path = Path(__file__).resolve().parent / "student_config.json"
"""The default student's transformers config (JSON)."""
