"""Loading the student: whatever fails to load (a broken tokenizer, student directory or model
config) is one `ConfigError` naming the option, the path and the fix, never a library's
traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from schemas.cache import open_cache
from schemas.errors import ConfigError
from student_trainer import TrainConfig
from student_trainer.student import load_student


def config(small_cache: str, tmp_path: Path, **student: str) -> TrainConfig:
    return TrainConfig(cache=small_cache, out=str(tmp_path / "run"), **student)


def broken_copy(source: Path, target: Path, name: str) -> Path:
    """A copy of the saved model or tokenizer at `source` whose file `name` is cut short."""
    shutil.copytree(source, target)
    data = (target / name).read_bytes()
    (target / name).write_bytes(data[: len(data) // 3])
    return target


def load(cfg: TrainConfig) -> str:
    """The message of the ConfigError loading `cfg`'s student raises."""
    with pytest.raises(ConfigError) as raised:
        load_student(cfg, open_cache(cfg.cache))
    assert raised.value.hint, "the error says how to fix it"
    return str(raised.value)


def test_a_truncated_tokenizer_is_named(small_cache, fresh_student, tiny_llama_dir, tmp_path):
    folder = broken_copy(tiny_llama_dir, tmp_path / "tok", "tokenizer.json")
    message = load(
        config(small_cache, tmp_path, student_config=fresh_student, tokenizer=str(folder))
    )
    assert f"--tokenizer {folder}" in message and "save_pretrained" in message, message


def test_a_student_with_a_truncated_config_is_named(small_cache, tiny_llama_dir, tmp_path):
    folder = broken_copy(tiny_llama_dir, tmp_path / "student", "config.json")
    message = load(config(small_cache, tmp_path, student=str(folder)))
    assert f"--student {folder}" in message and "save_pretrained" in message, message


def test_a_student_without_weights_is_named(small_cache, tiny_llama_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "student"))
    (folder / "model.safetensors").unlink()
    message = load(config(small_cache, tmp_path, student=str(folder)))
    assert f"--student {folder}" in message, message


@pytest.mark.parametrize(
    "fields",
    [{"model_type": "no-such-model"}, {"model_type": "llama", "vocab_size": -1}, {"vocab_size": 8}],
)
def test_a_student_config_that_cannot_build_a_model_is_named(small_cache, tmp_path, fields):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(fields))
    message = load(config(small_cache, tmp_path, student_config=str(path)))
    assert f"--student-config {path}" in message, message
