"""The committed default teacher, the corpus it was trained on and the matching student config."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from cache_builder.default import (
    DEFAULT_TEACHER_DIR,
    MIN_CHARS,
    default_corpus,
    write_default_dataset,
)
from student_trainer.default import DEFAULT_STUDENT_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIGEST = (
    "import hashlib, json; from cache_builder.default import default_corpus; "
    "print(hashlib.sha256(json.dumps([default_corpus('train'), "
    "default_corpus('validation')]).encode()).hexdigest())"
)


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[dict[str, str]]]:
    return {split: default_corpus(split) for split in ("train", "validation")}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_TEACHER_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def teacher():
    model = AutoModelForCausalLM.from_pretrained(
        DEFAULT_TEACHER_DIR, local_files_only=True, dtype=torch.float32
    )
    return model.eval()


def mean_ce(model, windows: torch.Tensor) -> float:
    """Next-token cross-entropy in nats over ``windows`` ``(B, T + 1)``, in float32."""
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()


def test_teacher_loads_offline_with_a_real_vocabulary(tokenizer, teacher) -> None:
    assert len(tokenizer) >= 4096
    assert teacher.config.vocab_size == len(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == eot
    assert teacher.config.eos_token_id == eot
    text = "Return a new list containing all items from the iterable in ascending order."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in chat


def test_teacher_beats_a_random_init_on_held_out_text(corpus, tokenizer, teacher) -> None:
    eot = tokenizer.eos_token_id
    docs = [d["text"] for d in corpus["validation"] if len(d["text"]) > 2000][:4]
    windows = torch.tensor(
        [[eot, *tokenizer(text[:2000])["input_ids"][:128]] for text in docs]
    )  # (4, 129)
    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(teacher.config).eval()
    teacher_ce, random_ce = mean_ce(teacher, windows), mean_ce(random_init, windows)
    assert random_ce > 0.9 * math.log(len(tokenizer))
    assert teacher_ce < random_ce - 3.0, (teacher_ce, random_ce)


def test_training_record_matches_the_committed_teacher(tokenizer) -> None:
    info = json.loads((DEFAULT_TEACHER_DIR / "TRAINING.json").read_text())
    assert info["recipe"]["vocab_size"] == len(tokenizer)
    assert info["final_val_loss"] < info["random_init_val_loss"] - 3.0
    assert info["python"].count(".") == 2


def test_default_corpus_is_deterministic_across_processes(corpus) -> None:
    here = hashlib.sha256(json.dumps([corpus["train"], corpus["validation"]]).encode())
    for hash_seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", CORPUS_DIGEST],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            cwd=REPO_ROOT,
        )
        assert other.stdout.strip() == here.hexdigest()


def test_splits_are_disjoint_and_about_ten_percent(corpus) -> None:
    train = {d["source"] for d in corpus["train"]}
    validation = {d["source"] for d in corpus["validation"]}
    assert not train & validation
    assert len(train) == len(corpus["train"]) and len(validation) == len(corpus["validation"])
    assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.2
    assert {"pydoc:for", "module:json"} <= train | validation
    for docs in corpus.values():
        assert [d["source"] for d in docs] == sorted(d["source"] for d in docs)
        assert all(len(d["text"]) >= MIN_CHARS for d in docs)
        assert not any(" at 0x" in d["text"] for d in docs)


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="validation"):
        default_corpus("test")  # type: ignore[arg-type]


def test_write_default_dataset_round_trips(tmp_path, corpus) -> None:
    path = write_default_dataset(tmp_path / "data", "validation")
    assert path == tmp_path / "data" / "default-validation.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == corpus["validation"]


def test_student_config_matches_the_teacher_tokenizer(tokenizer) -> None:
    data = json.loads(DEFAULT_STUDENT_CONFIG.read_text())
    config = AutoConfig.for_model(**data)
    assert isinstance(config, LlamaConfig)
    assert LlamaConfig.from_dict(data).to_dict() == config.to_dict()
    assert config.vocab_size == len(tokenizer)
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.tie_word_embeddings
