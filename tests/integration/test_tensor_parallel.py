"""Teachers split over ranks: `torchrun ... kdcache build --tp`, `--device-map auto`, quantized.

Every build runs `kdcache` in a subprocess as a user does, under torchrun with gloo on the
CPU where ranks are involved. A TP build must give the cache a one-process build gives: the
same token stream, counts and fingerprint; top-k ids equal wherever the one-process values
have no near-tie; values within a stated float tolerance (TP reorders float sums, and the
vocabulary is walked in one chunk per slice). The tolerance and the largest difference seen
are printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from schemas import open_cache
from schemas.validate import validate_cache
from tests.fixtures.cli import ENV, free_port, kdcache, one_line_error
from tests.fixtures.models import make_tiny_llama, make_tokenizer, save_tiny_model

pytestmark = pytest.mark.integration

SETTINGS = [
    "--max-length", "64", "--top-k", "8", "--shard-tokens", "512", "--batch-tokens", "128",
    "--value-encoding", "float32", "--no-progress",
]  # fmt: skip
"""Small shards (a build that can be killed mid-way), raw float32 values to compare."""

TOLERANCE = 2e-5
"""Max |difference| of log-probs, lse and tails between a TP and a one-process build (nats)."""

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        TORCHRUN, "--nproc_per_node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "kdcache", *args,
    ]  # fmt: skip


def build_args(teacher: Path, data: Path, out: Path) -> list[str]:
    return ["build", "--teacher", str(teacher), "--dataset", str(data), "--out", str(out)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def tp_build(nproc: int, tp: int, teacher: Path, data: Path, out: Path, *extra: str) -> None:
    done = run(torchrun(nproc, *build_args(teacher, data, out), *SETTINGS, "--tp", str(tp), *extra))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pydoc_data.topics as topics

    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    with path.open("w") as f:
        for _, text in sorted(topics.topics.items())[:10]:
            f.write(json.dumps({"text": text[:1500]}) + "\n")
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama with an odd vocabulary (uneven slices) and a Qwen2 with tied embeddings."""
    from transformers import Qwen2Config

    root = tmp_path_factory.mktemp("teachers")
    qwen = Qwen2Config(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.2,
    )  # fmt: skip
    return {
        "llama": make_tiny_llama(root / "llama", vocab_size=385, seed=1),
        "qwen2": save_tiny_model(root / "qwen2", qwen, seed=2),
    }


@pytest.fixture(scope="module")
def references(
    tmp_path_factory: pytest.TempPathFactory, teachers: dict, docs: Path
) -> dict[str, Path]:
    """One-process builds of each teacher."""
    root = tmp_path_factory.mktemp("one-process")
    out = {}
    for name in ("llama", "qwen2"):
        out[name] = root / name
        kdcache(*build_args(teachers[name], docs, out[name]), *SETTINGS)
    return out


def compare(cache: Path, reference: Path) -> dict[str, float]:
    """Assert `cache` holds what `reference` holds (see the module docstring); the largest
    differences seen, per field."""
    a, b = open_cache(str(cache)), open_cache(str(reference))
    assert a.complete and b.complete
    assert a.manifest.fingerprint == b.manifest.fingerprint
    assert a.manifest.num_tokens == b.manifest.num_tokens
    assert [s.num_tokens for s in a.shards] == [s.num_tokens for s in b.shards]
    worst: dict[str, float] = {}
    for i in range(len(b.shards)):
        x, y = a.read_shard(i), b.read_shard(i)
        assert np.array_equal(x.input_ids, y.input_ids)
        assert np.array_equal(x.seq_offsets, y.seq_offsets)
        for name in ("topk_logprobs", "lse", "log_tail", "label_logprob"):
            d = np.abs(getattr(x, name).astype(np.float64) - getattr(y, name))
            worst[name] = max(worst.get(name, 0.0), float(np.nanmax(d)))
        v = y.topk_logprobs
        gaps = np.abs(np.diff(v, axis=1))  # where a neighbour is within tolerance, order may swap
        near_tie = np.zeros_like(x.topk_ids, dtype=bool)
        near_tie[:, :-1] |= gaps < 2 * TOLERANCE
        near_tie[:, 1:] |= gaps < 2 * TOLERANCE
        near_tie[:, -1] = True  # the k+1-th value is not stored: the last id may change place
        differs = x.topk_ids != y.topk_ids
        assert not (differs & ~near_tie).any(), f"shard {i}: ids differ away from near-ties"
        worst["rows_with_other_ids"] = worst.get("rows_with_other_ids", 0) + int(
            differs.any(1).sum()
        )
    for name in ("topk_logprobs", "lse", "log_tail", "label_logprob"):
        assert worst[name] < TOLERANCE, (name, worst[name])
    print(f"largest differences from the one-process build: {worst}")
    return worst


@pytest.fixture(scope="module")
def tp2_builds(tmp_path_factory: pytest.TempPathFactory, teachers: dict, docs: Path) -> dict:
    """`torchrun --nproc_per_node 2 ... --tp 2` builds of each teacher."""
    root = tmp_path_factory.mktemp("tp2")
    for name in ("llama", "qwen2"):
        tp_build(2, 2, teachers[name], docs, root / name)
    return {name: root / name for name in ("llama", "qwen2")}


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_tp2_build_equals_the_one_process_build(references, tp2_builds, model):
    out = tp2_builds[model]
    compare(out, references[model])
    parallel = open_cache(str(out)).manifest.build.config["parallel"]
    assert parallel == {"tp": 2, "dp": 1, "world_size": 2, "device_map": None}
    assert validate_cache(str(out), deep=True) == []


def same_shards(cache: Path, other: Path) -> None:
    a, b = open_cache(str(cache)), open_cache(str(other))
    assert a.complete and len(a.shards) == len(b.shards) > 4
    assert all(a.read_shard(i).equals(b.read_shard(i)) for i in range(len(a.shards)))


def test_two_groups_of_two(teachers, references, tp2_builds, docs, tmp_path):
    """4 ranks, --tp 2: two data-parallel groups, each writing its own shards."""
    tp_build(4, 2, teachers["llama"], docs, tmp_path / "two-groups")
    compare(tmp_path / "two-groups", references["llama"])
    # the same split of the vocabulary computes the same bits, whichever group ran a shard
    same_shards(tmp_path / "two-groups", tp2_builds["llama"])
    assert open_cache(str(tmp_path / "two-groups")).manifest.build.config["parallel"]["dp"] == 2


def start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def kill_after_commits(proc: subprocess.Popen[str], cache: Path, commits: int) -> None:
    """SIGKILL the whole process group (torchrun and its ranks) once `commits` shards are in."""
    deadline = time.monotonic() + 240
    folder = cache / "commits"
    while time.monotonic() < deadline and proc.poll() is None:
        if folder.is_dir() and len(list(folder.glob("[0-9]*.json"))) >= commits:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_tp_build_resumes_to_the_same_cache(teachers, tp2_builds, docs, tmp_path):
    teacher, out = teachers["llama"], tmp_path / "killed"
    proc = start(torchrun(2, *build_args(teacher, docs, out), *SETTINGS, "--tp", "2"))
    kill_after_commits(proc, out, 2)
    tp_build(2, 2, teacher, docs, out, "--break-lock")
    same_shards(out, tp2_builds["llama"])


def test_resume_under_another_tp(teachers, references, docs, tmp_path):
    """A one-process build killed mid-way finishes under --tp 2 (no samples: allowed)."""
    teacher, out = teachers["llama"], tmp_path / "mixed"
    proc = start([sys.executable, "-m", "kdcache", *build_args(teacher, docs, out), *SETTINGS])
    kill_after_commits(proc, out, 2)
    tp_build(2, 2, teacher, docs, out, "--break-lock")
    compare(out, references["llama"])


def test_resume_of_a_sampled_cache_under_another_tp_is_refused(teachers, docs, tmp_path):
    teacher, out = teachers["llama"], tmp_path / "sampled"
    proc = start(
        torchrun(2, *build_args(teacher, docs, out), *SETTINGS, "--tp", "2", "--samples", "4")
    )
    kill_after_commits(proc, out, 1)
    args = [*build_args(teacher, docs, out), *SETTINGS, "--samples", "4", "--break-lock"]
    line = one_line_error(kdcache(*args, check=False))
    assert "--tp 2" in line and "sampled" in line and "--overwrite" in line


def test_device_map_auto_with_offload_equals_the_plain_build(teachers, references, docs, tmp_path):
    """A max-memory too small for the teacher: accelerate offloads layers (to the disk here)."""
    out = tmp_path / "device-map"
    args = build_args(teachers["llama"], docs, out)
    kdcache(*args, *SETTINGS, "--device-map", "auto", "--max-memory", "cpu=60KB")
    compare(out, references["llama"])
    assert open_cache(str(out)).manifest.build.config["parallel"]["device_map"] == "auto"


def test_quantized_teacher_is_built_and_recorded(teachers, docs, tmp_path):
    from tests.fixtures.quantized import make_quantized_teacher

    teacher = make_quantized_teacher(tmp_path / "teacher")
    make_tokenizer(1000).save_pretrained(teacher)
    out = tmp_path / "cache"
    kdcache(*build_args(teacher, docs, out), *SETTINGS)
    manifest = json.loads((out / "manifest.json").read_text())
    quant = manifest["teacher_quantization"]
    assert quant["must_understand"] is False and quant["quant_method"] == "torchao"
    shown = kdcache("inspect", str(out)).stdout
    assert "quantization: torchao" in shown
    assert validate_cache(str(out), deep=True) == []


# -- errors: one line each, naming the option and the fix ----------------------------------


def no_kdcache_traceback(output: str) -> None:
    """torchrun prints its own summary of a failed rank; no frame of kdcache may show."""
    assert "cache_builder/" not in output and "kdcache/" not in output, output[-3000:]


def test_tp_without_torchrun(teachers, docs, tmp_path):
    proc = kdcache(*build_args(teachers["llama"], docs, tmp_path / "c"), "--tp", "2", check=False)
    line = one_line_error(proc)
    assert "--tp 2" in line and "torchrun --nproc_per_node 2" in line


def test_tp_that_does_not_divide_the_world(teachers, docs, tmp_path):
    done = run(torchrun(2, *build_args(teachers["llama"], docs, tmp_path / "c"), "--tp", "3"))
    assert done.returncode != 0
    assert "Error: --tp 3 does not divide the 2 process(es)" in done.stderr
    no_kdcache_traceback(done.stderr)


def test_model_without_a_tp_plan(docs, tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=4, n_positions=256)
    teacher = save_tiny_model(tmp_path / "gpt2", config)
    done = run(torchrun(2, *build_args(teacher, docs, tmp_path / "c"), *SETTINGS, "--tp", "2"))
    assert done.returncode != 0
    assert "no tensor-parallel plan for model_type 'gpt2'" in done.stderr
    assert "--device-map auto" in done.stderr
    no_kdcache_traceback(done.stderr)


def test_heads_that_do_not_split(docs, tmp_path):
    teacher = make_tiny_llama(tmp_path / "llama", num_key_value_heads=1)
    done = run(torchrun(2, *build_args(teacher, docs, tmp_path / "c"), *SETTINGS, "--tp", "2"))
    assert done.returncode != 0
    assert "1 key/value heads do not split over --tp 2" in done.stderr
    no_kdcache_traceback(done.stderr)


def test_accelerate_missing(teachers, docs, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # As if it were not installed: find_spec answers None, and an import fails.
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['accelerate'] = None\n")
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    args = build_args(teachers["llama"], docs, tmp_path / "c")
    line = one_line_error(kdcache(*args, *SETTINGS, "--device-map", "auto", env=env, check=False))
    assert "accelerate" in line and "pip install" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tp", "2", "--device-map", "auto"], "--tp and --device-map"),
        (["--max-memory", "0=10GiB"], "--max-memory applies to --device-map auto"),
        (["--device-map", "auto", "--max-memory", "gpu0:10"], "is not DEVICE=SIZE"),
    ],
)
def test_bad_split_options(teachers, docs, tmp_path, flags, expected):
    args = build_args(teachers["llama"], docs, tmp_path / "c")
    assert expected in one_line_error(kdcache(*args, *flags, check=False))
