"""Training beyond one process and one disk: `torchrun` DDP and FSDP equal gradient accumulation
(FSDP's checkpoint resumes and its saved student loads), and a cache on `memory://` or on S3 (a
moto server on 127.0.0.1) trains exactly like the same cache on local disk, the tokenizer copy
included."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from cache_builder import build
from schemas.cache import TOKENIZER_DIR, CacheWriter, open_cache
from schemas.errors import IncompatibleCacheError
from student_trainer import TrainConfig, train
from tests.fixtures.caches import pydoc_jsonl, small_build_config

pytestmark = pytest.mark.integration

SEQ = 32
"""Tokens per cached sequence (the build's --max-length)."""


@pytest.fixture(scope="module")
def built_cache(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache of the tiny teacher over long documents: most sequences are full SEQ-token windows."""
    data = pydoc_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", 6, 1500)
    out = tmp_path_factory.mktemp("cache") / "c"
    build(
        small_build_config(
            tiny_llama_dir, data, out, max_length=SEQ, shard_tokens=512, batch_tokens=256
        )
    )
    return str(out)


def reshard(src: str, dst: str, shards: int) -> str:
    """A copy of `src` whose shard i holds exactly one full SEQ-token sequence of `src`."""
    cache = open_cache(src)
    full = [
        records.sequences(s, s + 1)
        for records in cache
        for s in range(records.num_sequences)
        if records.seq_offsets[s + 1] - records.seq_offsets[s] == SEQ
    ]
    assert len(full) >= shards
    # The copy's dataset is the shards it keeps: train refuses a manifest whose shard tokens
    # do not add up to its dataset.num_tokens.
    dataset = dataclasses.replace(cache.manifest.dataset, num_tokens=SEQ * shards)
    writer = CacheWriter(dst, dataclasses.replace(cache.manifest, dataset=dataset))
    for i in range(shards):
        with writer.shard_writer(i) as w:
            w.write(full[i])
            writer.commit_shard(w)
    writer.finalize(shards)
    return dst


def convert(src: str, dst: str, fmt: str) -> str:
    """`src` rewritten in shard format `fmt`, its tokenizer copy included."""
    cache = open_cache(src)
    writer = CacheWriter(dst, dataclasses.replace(cache.manifest, format=fmt))
    for i, records in enumerate(cache):
        with writer.shard_writer(i) as w:
            w.write(records)
            writer.commit_shard(w)
    writer.finalize(len(cache.shards))
    cache.fs.put(f"{cache.root}/{TOKENIZER_DIR}", f"{dst}/{TOKENIZER_DIR}", recursive=True)
    return dst


def student_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student" / "model.safetensors")


SAME = 1e-4
"""Parameters "equal" after 4 AdamW steps at lr 1e-2 from sums taken in another order: AdamW
divides each entry's gradient by its own scale, so an entry whose gradient is near rounding level
moves a rounding-sized amount of a whole step (seen: 4e-5 on one entry, 1e-6 elsewhere). 1% of
one step; the control that sees other data differs by more than 1e-2."""


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


LAUNCH = """
import json, sys
from student_trainer import TrainConfig, train
train(TrainConfig(**json.loads(sys.argv[1])))
"""

LAUNCH_KEEPING_A_CHECKPOINT = """
import importlib, json, shutil, sys
from pathlib import Path
import torch.distributed as dist
from student_trainer import TrainConfig, train

train_module = importlib.import_module("student_trainer.train")  # the module, not the function

config, keep_step, keep = json.loads(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
real_save = train_module.save_checkpoint

def save_and_keep(out, net, optimizer, schedule, progress, **recorded):
    real_save(out, net, optimizer, schedule, progress, **recorded)
    if progress.step == keep_step and dist.get_rank() == 0:  # what a run killed here leaves
        keep.mkdir()
        for name in (train_module.CHECKPOINT, "metrics.jsonl"):
            shutil.copy(out / name, keep / name)

train_module.save_checkpoint = save_and_keep
train(TrainConfig(**config))
"""


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(tmp_path: Path, script: str, *args: str) -> str:
    """Run `script` under `torchrun --standalone --nproc_per_node 2` (gloo on CPU; --standalone
    picks a free rendezvous port); return its stderr."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run = subprocess.run(
        [*command, "--nproc_per_node", "2", str(launcher), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stderr


@pytest.fixture(scope="module")
def scale_run(built_cache, tiny_llama_dir, tmp_path_factory) -> dict:
    """Settings of the 2-rank runs and their 1-process twin: a cache of 8 one-sequence shards,
    every shard one micro-batch (ShardStream's documented rule), 4 steps = two epochs at 4
    micro-batches per step."""
    cache = reshard(built_cache, str(tmp_path_factory.mktemp("scale") / "one-per-shard"), 8)
    return dict(
        cache=cache,
        student=str(tiny_llama_dir),
        loss="fkl",
        ce_weight=0.1,
        batch_tokens=SEQ,
        shuffle_buffer=0,
        max_steps=4,
        lr=1e-2,
        warmup_steps=1,
        seed=7,
        log_every=1,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def accumulated(scale_run: dict, tmp_path_factory) -> Path:
    """One process with grad_accum 4: what 2 ranks with grad_accum 2 must reproduce."""
    out = tmp_path_factory.mktemp("scale") / "single"
    train(TrainConfig(out=str(out), grad_accum=4, **scale_run))
    return out


def assert_same_steps(run: list[dict], reference: list[dict]) -> None:
    """Same loss and gradient norm at every step. AdamW and clipping would hide a gradient off
    by a constant factor; the logged norm (before clipping) does not."""
    assert [r["step"] for r in run] == [1, 2, 3, 4]
    for a, b in zip(run, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_ddp_equals_gradient_accumulation(scale_run, accumulated, tiny_llama_dir, tmp_path) -> None:
    """`torchrun --nproc_per_node 2` with grad_accum 2 ends at the parameters of one process with
    grad_accum 4, and logs the same loss and gradient norm at every step: each optimizer step
    sees the same four micro-batches, averaged the same way (DDP averages the ranks' gradients,
    each rank divides by its own accumulation)."""
    train(TrainConfig(out=str(tmp_path / "half"), grad_accum=2, **scale_run))
    ddp_config = {**scale_run, "out": str(tmp_path / "ddp"), "grad_accum": 2}
    assert "FSDP" not in torchrun(tmp_path, LAUNCH, json.dumps(ddp_config))

    assert_same_steps(metrics(tmp_path / "ddp"), metrics(accumulated))
    start = load_file(tiny_llama_dir / "model.safetensors")
    final = student_weights(accumulated)
    assert max_difference(final, start) > 1e-2, "training must move the parameters"
    assert max_difference(student_weights(tmp_path / "ddp"), final) < SAME
    # Control: one process with half the accumulation sees half the data and ends elsewhere.
    assert max_difference(student_weights(tmp_path / "half"), final) > 1e-2


def test_fsdp_equals_gradient_accumulation_and_resumes(
    scale_run, accumulated, tiny_llama_dir, tmp_path
) -> None:
    """`--fsdp` on 2 ranks (each decoder layer and the root sharded, gloo on CPU) matches one
    process with twice the accumulation step for step, so the loss inside forward saw the whole
    lm_head and the sharded gradient norm is the global one. Its checkpoint at step 2 (full
    tensors gathered from the shards) resumes on 2 FSDP ranks to the same end, and the saved
    student is an ordinary full model that `from_pretrained` loads."""
    from transformers import AutoModelForCausalLM

    fsdp_config = {
        **scale_run,
        "out": str(tmp_path / "fsdp"),
        "grad_accum": 2,
        "fsdp": True,
        "checkpoint_every": 2,
    }
    crashed = tmp_path / "crashed"
    log = torchrun(
        tmp_path, LAUNCH_KEEPING_A_CHECKPOINT, json.dumps(fsdp_config), "2", str(crashed)
    )
    assert "FSDP over 2 ranks in 3 units" in log  # the tiny student's 2 layers and the root
    resumed_config = {**fsdp_config, "out": str(crashed), "resume": True}
    log = torchrun(tmp_path, LAUNCH, json.dumps(resumed_config))
    assert "FSDP over 2 ranks in 3 units" in log and "resumed from step 2" in log

    reference = metrics(accumulated)
    assert_same_steps(metrics(tmp_path / "fsdp"), reference)
    assert_same_steps(metrics(crashed), reference)
    final = student_weights(accumulated)
    start = load_file(tiny_llama_dir / "model.safetensors")
    assert max_difference(final, start) > 1e-2, "training must move the parameters"
    assert max_difference(student_weights(tmp_path / "fsdp"), final) < SAME
    assert max_difference(student_weights(crashed), final) < SAME
    # The checkpoint is full tensors, not one rank's shards.
    checkpoint = torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=False)
    assert checkpoint["model"]["model.lm_head.weight"].shape == final["lm_head.weight"].shape

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "student")
    assert max_difference(dict(loaded.state_dict()), final) < SAME


def test_fewer_shards_than_ranks_is_refused(built_cache, tiny_llama_dir, tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("student_trainer.train")
    shards = len(open_cache(built_cache).shards)
    monkeypatch.setattr(train_module, "_ranks", lambda: (0, shards + 1, 0))
    with pytest.raises(IncompatibleCacheError, match="--shard-tokens"):
        train(
            TrainConfig(
                cache=built_cache, out=str(tmp_path), student=str(tiny_llama_dir), progress=False
            )
        )


def fresh_student_config(tiny_llama_dir: Path, folder: Path) -> str:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    path = folder / "student.json"
    path.write_text(json.dumps(config))
    return str(path)


def losses(cfg: TrainConfig) -> list[float]:
    """Per-step losses of a short run from a fresh student set up from the cache alone (its
    tokenizer is the cache's copy, downloaded when the cache is remote)."""
    result = train(cfg)
    assert result.steps == cfg.max_steps
    rows = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["loss"] for row in rows]


def remote_run(cache: str, out: Path, student_config: str, **overrides) -> TrainConfig:
    settings = dict(
        cache=cache,
        out=str(out),
        student_config=student_config,
        loss="fkl-tail",
        max_steps=3,
        batch_tokens=128,
        shuffle_buffer=16,
        log_every=1,
        save_model=False,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def test_training_from_memory_url_equals_local(built_cache, tiny_llama_dir, tmp_path) -> None:
    assert open_cache(built_cache).has_tokenizer()
    student = fresh_student_config(tiny_llama_dir, tmp_path)
    fs = fsspec.filesystem("memory")
    fs.put(built_cache, "/kdcache-train/cache", recursive=True)
    try:
        assert fs.exists(f"/kdcache-train/cache/{TOKENIZER_DIR}/tokenizer.json")
        local = losses(remote_run(built_cache, tmp_path / "local", student))
        remote = losses(remote_run("memory://kdcache-train/cache", tmp_path / "memory", student))
    finally:
        fs.rm("/kdcache-train", recursive=True)
    assert remote == local


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_training_from_s3_equals_local(
    built_cache, tiny_llama_dir, tmp_path, s3_options: dict, fmt: str
) -> None:
    """The cache copied into a bucket: two DataLoader workers each open it over S3 and the run
    matches the same run on the local copy, step for step."""
    import s3fs

    local = convert(built_cache, str(tmp_path / fmt), fmt)
    fs = s3fs.S3FileSystem(**s3_options)
    if not fs.exists("kdcache-test"):
        fs.mkdir("kdcache-test")
    fs.put(local, f"kdcache-test/cache-{fmt}", recursive=True)
    student = fresh_student_config(tiny_llama_dir, tmp_path)
    on_disk = losses(remote_run(local, tmp_path / "local", student, num_workers=2))
    remote = losses(
        remote_run(
            f"s3://kdcache-test/cache-{fmt}",
            tmp_path / "s3",
            student,
            num_workers=2,
            storage_options=s3_options,
        )
    )
    assert remote == on_disk
