"""Both stages end to end on a tiny random Llama and local text: build, validate, train with
every registered loss, resume, and the errors a user meets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_builder import build
from kdcache.cli import main
from schemas import open_cache
from schemas.validate import validate_cache
from student_trainer import LOSSES, TrainConfig, train
from tests.fixtures.caches import pydoc_jsonl, small_build_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pydoc_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", 24, 900)


@pytest.fixture(scope="module")
def sampled_cache(
    tiny_llama_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    out = tmp_path_factory.mktemp("cache") / "c"
    build(small_build_config(tiny_llama_dir, data_file, out, samples=6, temperatures=(2.0,)))
    return str(out)


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_build_is_valid_deterministic_and_resumable(
    tiny_llama_dir, data_file, tmp_path, fmt
) -> None:
    cfg = small_build_config(tiny_llama_dir, data_file, tmp_path / "a", format=fmt)
    first = build(cfg)
    assert first.shards > 1 and first.tokens > 0 and not first.already_complete
    assert validate_cache(cfg.out, deep=True) == []
    assert build(cfg).already_complete
    again = build(small_build_config(tiny_llama_dir, data_file, tmp_path / "b", format=fmt))
    a, b = open_cache(cfg.out).manifest, open_cache(str(tmp_path / "b")).manifest
    assert [s.checksum for s in a.shards] == [s.checksum for s in b.shards], (
        "CPU builds must be byte-identical"
    )
    assert again.tokens == first.tokens


def test_other_settings_are_refused_unless_overwrite(tiny_llama_dir, data_file, tmp_path) -> None:
    build(small_build_config(tiny_llama_dir, data_file, tmp_path / "c"))
    runner = CliRunner()
    args = [
        "build",
        "--teacher",
        str(tiny_llama_dir),
        "--dataset",
        str(data_file),
        "--out",
        str(tmp_path / "c"),
        "--max-length",
        "96",
        "--top-k",
        "4",
        "--shard-tokens",
        "1024",
        "--batch-tokens",
        "384",
        "--no-progress",
    ]
    refused = runner.invoke(main, args)
    assert refused.exit_code != 0 and "top_k" in refused.output and "--overwrite" in refused.output
    done = runner.invoke(main, [*args, "--overwrite"])
    assert done.exit_code == 0, done.output
    assert open_cache(str(tmp_path / "c")).layout.k == 4


@pytest.mark.parametrize("case", ["no-teacher", "no-dataset", "no-field"])
def test_bad_input_is_one_clear_line(tiny_llama_dir, data_file, tmp_path, case) -> None:
    teacher = str(tmp_path / "missing") if case == "no-teacher" else str(tiny_llama_dir)
    dataset = str(tmp_path / "missing.jsonl") if case == "no-dataset" else str(data_file)
    args = [
        "build",
        "--teacher",
        teacher,
        "--dataset",
        dataset,
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    if case == "no-field":
        args += ["--text-field", "body"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.output.strip().splitlines()[-1].startswith(
        "Error:"
    )
    assert {"no-teacher": "missing", "no-dataset": "missing.jsonl", "no-field": "body"}[
        case
    ] in result.output


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_from_the_cache(sampled_cache, tiny_llama_dir, tmp_path, loss) -> None:
    result = train(
        TrainConfig(
            cache=sampled_cache,
            out=str(tmp_path / loss),
            student=str(tiny_llama_dir),
            loss=loss,
            max_steps=2,
            batch_tokens=192,
            progress=False,
            save_model=False,
            ce_weight=0.0 if LOSSES[loss].builtin_ce({}) else 0.1,
        )
    )
    assert result.steps == 2 and result.final_loss == result.final_loss  # finite, not NaN
    assert (tmp_path / loss / "metrics.jsonl").exists()


def test_ce_weight_on_a_loss_with_its_own_ce_is_refused(
    sampled_cache, tiny_llama_dir, tmp_path
) -> None:
    options = ["--cache", sampled_cache, "--out", str(tmp_path / "o"), "--loss", "dkd"]
    result = CliRunner().invoke(main, ["train", *options, "--ce-weight", "0.5"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "already adds the next-token cross-entropy (ce=1)" in result.output
    assert "--loss-option ce=" in result.output
    ok = train(
        TrainConfig(
            cache=sampled_cache,
            out=str(tmp_path / "ok"),
            student=str(tiny_llama_dir),
            loss="dkd",
            loss_options={"ce": "0"},
            ce_weight=0.5,
            max_steps=1,
            batch_tokens=192,
            progress=False,
            save_model=False,
        )
    )
    assert ok.steps == 1


def test_fresh_student_learns_and_is_saved(sampled_cache, tiny_llama_dir, tmp_path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    (tmp_path / "student.json").write_text(json.dumps(config))
    result = train(
        TrainConfig(
            cache=sampled_cache,
            out=str(tmp_path / "run"),
            student_config=str(tmp_path / "student.json"),
            loss="fkl-tail",
            max_steps=30,
            lr=3e-3,
            warmup_steps=3,
            batch_tokens=384,
            progress=False,
            eval_cache=sampled_cache,
            eval_every=15,
        )
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["eval_kl_topk"] for r in rows if "eval_kl_topk" in r]
    assert evals[-1] < evals[0], "KL to the teacher should fall while training on the cache"
    assert (tmp_path / "run" / "student" / "config.json").exists()
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    assert 0 <= result.eval["eval_top1_agreement"] <= 1


def test_resume_reproduces_the_uninterrupted_curve(
    sampled_cache, tiny_llama_dir, tmp_path, monkeypatch
) -> None:
    import importlib
    import shutil

    train_module = importlib.import_module("student_trainer.train")

    common = dict(
        cache=sampled_cache,
        student=str(tiny_llama_dir),
        loss="fkl",
        batch_tokens=192,
        max_steps=6,
        progress=False,
        save_model=False,
        log_every=1,
        warmup_steps=2,
        checkpoint_every=3,
    )
    real_save = train_module.save_checkpoint

    def save_and_keep_step_3(out, net, optimizer, schedule, progress, **recorded):
        real_save(out, net, optimizer, schedule, progress, **recorded)
        if progress.step == 3:  # what a run killed after step 3 leaves behind
            crashed = tmp_path / "crashed"
            crashed.mkdir()
            shutil.copy(out / train_module.CHECKPOINT, crashed / train_module.CHECKPOINT)
            shutil.copy(out / "metrics.jsonl", crashed / "metrics.jsonl")

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_keep_step_3)
    train(TrainConfig(out=str(tmp_path / "full"), **common))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train(TrainConfig(out=str(tmp_path / "crashed"), resume=True, **common))
    full = [
        json.loads(x)["loss"]
        for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    resumed = [
        json.loads(x)["loss"]
        for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(full) == 6 and resumed == full


def test_rskd_needs_samples_and_tokenizers_must_match(tiny_llama_dir, data_file, tmp_path) -> None:
    build(small_build_config(tiny_llama_dir, data_file, tmp_path / "plain"))
    runner = CliRunner()
    base = [
        "train",
        "--cache",
        str(tmp_path / "plain"),
        "--student",
        str(tiny_llama_dir),
        "--max-steps",
        "1",
        "--no-progress",
    ]
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "r"), "--loss", "rskd"])
    assert (
        result.exit_code != 0 and "--samples" in result.output and "Traceback" not in result.output
    )
    result = runner.invoke(
        main, [*base, "--out", str(tmp_path / "r2"), "--loss", "jsd", "--loss-option", "gamma=2"]
    )
    assert result.exit_code != 0 and "beta" in result.output

    from tests.fixtures.models import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", vocab_size=400, seed=1)
    result = runner.invoke(
        main,
        [
            "train",
            "--cache",
            str(tmp_path / "plain"),
            "--student",
            str(other),
            "--out",
            str(tmp_path / "r3"),
            "--no-progress",
        ],
    )
    assert (
        result.exit_code != 0 and "tokenizer" in result.output and "Traceback" not in result.output
    )


def test_corrupt_shard_mid_training(tiny_llama_dir, data_file, tmp_path) -> None:
    build(small_build_config(tiny_llama_dir, data_file, tmp_path / "c", format="arrow"))
    cache = open_cache(str(tmp_path / "c"))
    victim = tmp_path / "c" / cache.shards[1].name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    args = [
        "train",
        "--cache",
        str(tmp_path / "c"),
        "--student",
        str(tiny_llama_dir),
        "--max-steps",
        "40",
        "--batch-tokens",
        "512",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(main, args)
    assert (
        result.exit_code != 0
        and cache.shards[1].name in result.output
        and "--skip-bad-shards" in result.output
    )
    result = CliRunner().invoke(main, [*args, "--skip-bad-shards"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "bad shard" in result.output


def test_python_api_reads_a_cache_without_torch(sampled_cache) -> None:
    code = f"import sys\nfrom schemas import open_cache\nr = open_cache({sampled_cache!r}).read_shard(0)\nprint(r.num_tokens > 0, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_max_documents_limits_the_build(tiny_llama_dir, data_file, tmp_path) -> None:
    small = build(small_build_config(tiny_llama_dir, data_file, tmp_path / "few", max_documents=3))
    assert open_cache(str(tmp_path / "few")).manifest.dataset.num_documents == 3
    assert (
        small.tokens < build(small_build_config(tiny_llama_dir, data_file, tmp_path / "all")).tokens
    )


def test_student_vocabulary_may_extend_the_teachers_only_when_allowed(
    sampled_cache, tiny_llama_dir, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.errors import IncompatibleCacheError

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<|tool_call|>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "extended")
    tokenizer.save_pretrained(tmp_path / "extended")
    common = dict(
        cache=sampled_cache,
        student=str(tmp_path / "extended"),
        loss="fkl",
        max_steps=1,
        batch_tokens=192,
        progress=False,
        save_model=False,
    )
    with pytest.raises(IncompatibleCacheError, match="allow-vocab-extension"):
        train(TrainConfig(out=str(tmp_path / "refused"), **common))
    assert (
        train(TrainConfig(out=str(tmp_path / "ok"), allow_vocab_extension=True, **common)).steps
        == 1
    )
