"""A small teacher cache and a fresh-student config for tests that run `train()` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.caches import pydoc_jsonl, small_build_config


@pytest.fixture(scope="session")
def small_cache(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny teacher over a few pydoc pages: ~1.5k tokens in 48-token sequences, k=8."""
    from cache_builder import build

    data = pydoc_jsonl(tmp_path_factory.mktemp("trainer-data") / "docs.jsonl", 8, 800)
    out = tmp_path_factory.mktemp("trainer-cache") / "c"
    build(
        small_build_config(
            tiny_llama_dir, data, out, max_length=48, shard_tokens=512, batch_tokens=192
        )
    )
    return str(out)


@pytest.fixture(scope="session")
def fresh_student(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JSON config for a smaller, freshly initialised student with the teacher's vocabulary:
    far from the teacher, so a few steps visibly lower its loss."""
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    path = tmp_path_factory.mktemp("fresh-student") / "student.json"
    path.write_text(json.dumps(config))
    return str(path)
