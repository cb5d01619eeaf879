"""What `kdcache train` refuses at start, in one line naming where the problem lies: a cache
whose manifest lost, doubled or renumbered a shard entry or whose token total disagrees with its
dataset (`--cache` and `--eval-cache` alike, with the check `kdcache validate` runs), and a
tokenizer copy truncated with its checksum forged to match.

The damaged manifests are checked in-process (one `train()` call each, refused before the
student loads); one case of each kind also runs as the installed command, to show the line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.errors import CacheCorruptError
from student_trainer import TrainConfig, train
from tests.fixtures.caches import pydoc_jsonl, small_build_config
from tests.fixtures.cli import kdcache, one_line_error
from tests.fixtures.models import tiny_student_config

pytestmark = [pytest.mark.integration, pytest.mark.reliability("tampered-cache")]


@pytest.fixture(scope="module")
def built(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher over a few pydoc pages: 8 shards."""
    from cache_builder import build

    root = tmp_path_factory.mktemp("refusals")
    data = pydoc_jsonl(root / "docs.jsonl", 8, 800)
    settings = dict(max_length=48, shard_tokens=512, batch_tokens=192)
    build(small_build_config(tiny_llama_dir, data, root / "cache", **settings))
    return root / "cache"


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))


def edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def lose(m: dict) -> None:
    del m["shards"][-1]


def double(m: dict) -> None:
    m["shards"][2] = {**m["shards"][1], "index": 2}


def renumber(m: dict) -> None:
    m["shards"][1]["index"] = 20


def miscount(m: dict) -> None:
    m["dataset"]["num_tokens"] += 5


DAMAGE = {
    "lost": (lose, "its shards hold"),
    "doubled": (double, "more than once (one shard read twice)"),
    "renumbered": (renumber, "missing [1], unexpected [20]"),
    "miscounted": (miscount, "its dataset.num_tokens says"),
}
"""A damage to the shard list, and what the refusal (and `kdcache validate`) says of it."""


@pytest.mark.parametrize("option", ["--cache", "--eval-cache"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_train_refuses_a_damaged_shard_list_naming_the_manifest(
    built: Path, cache: Path, tmp_path: Path, damage: str, option: str
) -> None:
    edit, expected = DAMAGE[damage]
    edit_manifest(cache, edit)
    caches = {"cache": str(built), "eval_cache": str(built)}
    caches[option.removeprefix("--").replace("-", "_")] = str(cache)
    cfg = TrainConfig(
        **caches,
        out=str(tmp_path / "run"),
        student_config=str(tiny_student_config(tmp_path)),
        max_steps=1,
        batch_tokens=128,
        progress=False,
        save_model=False,
    )
    with pytest.raises(CacheCorruptError) as raised:
        train(cfg)
    message = str(raised.value)
    assert f"{option} {cache}" in message and "manifest.json" in message, message
    assert expected in message and "kdcache validate" in message, message
    assert not (tmp_path / "run" / "checkpoint.pt").exists(), "refused before any training"


def test_the_command_refuses_a_lost_shard_entry_in_one_line(
    built: Path, cache: Path, tmp_path: Path
) -> None:
    edit_manifest(cache, lose)
    run = kdcache("train", "--cache", built, "--eval-cache", cache, "--out", tmp_path / "run",
                  "--student-config", tiny_student_config(tmp_path), "--max-steps", 1,
                  "--no-progress", check=False)  # fmt: skip
    line = one_line_error(run)
    assert f"--eval-cache {cache}: manifest.json: its shards hold" in line, line
    assert "kdcache validate" in line, line


def test_a_truncated_tokenizer_copy_with_a_forged_checksum_is_one_line(
    cache: Path, tmp_path: Path
) -> None:
    path = cache / "tokenizer" / "tokenizer.json"
    data = path.read_bytes()[:500]
    path.write_bytes(data)

    def forge(m: dict) -> None:
        entry = next(f for f in m["tokenizer"]["files"] if f["name"] == "tokenizer.json")
        entry.update(nbytes=len(data), checksum="sha256:" + hashlib.sha256(data).hexdigest())

    edit_manifest(cache, forge)
    run = kdcache("train", "--cache", cache, "--out", tmp_path / "run", "--student-config",
                  tiny_student_config(tmp_path), "--max-steps", 1, "--no-progress",
                  check=False)  # fmt: skip
    line = one_line_error(run)
    assert f"{cache}/tokenizer/tokenizer.json" in line and "not valid JSON" in line, line
    assert "--tokenizer" in line and "restore" in line, line
