"""`bench.quality` end to end on a tiny random Llama: every method trains through the one bench
loop, the report has its shape, and the online-KD loss is the dense full forward KL."""

import json
from pathlib import Path

import pytest
import torch

from bench.quality import Sizes, check_online_equals_registry, methods, online_fkl, run
from student_trainer.losses import LOSSES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import pydoc_data.topics as topics

    folder = tmp_path_factory.mktemp("quality-data")
    texts = [text[:700] for _, text in sorted(topics.topics.items())[:20]]
    paths = {"train": folder / "train.jsonl", "valid": folder / "valid.jsonl"}
    for name, chunk in (("train", texts[:16]), ("valid", texts[16:])):
        paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    student = dict(
        model_type="llama",
        vocab_size=384,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    paths["student"] = folder / "student.json"
    paths["student"].write_text(json.dumps(student))
    return paths


def test_online_kd_is_the_dense_full_fkl() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(12, 50, generator=gen, dtype=torch.float64) * 2
    z = torch.randn(12, 50, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (12,), generator=gen)
    reference = torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(z, -1), log_target=True, reduction="batchmean"
    )
    assert float(online_fkl(s, z)) == pytest.approx(float(reference), rel=1e-6)
    check = check_online_equals_registry(s, z, labels)
    assert check["abs_diff"] < 1e-6 and check["grad_max_abs_diff"] < 1e-6


def test_every_registered_loss_is_a_method() -> None:
    rows = methods(Sizes())
    losses = {m.loss for m in rows}
    assert losses >= set(LOSSES) - {"z-loss"} and None in losses
    assert {m.name for m in rows} >= {"fkl @8", "fkl @64", "fkl-tail @64", "bild @8"}


def test_quick_study_on_a_tiny_model(tiny_llama_dir: Path, files, tmp_path: Path) -> None:
    report = run(
        quick=True,
        seeds=(0,),
        steps=2,
        eval_tokens=256,
        teacher=str(tiny_llama_dir),
        dataset=str(files["train"]),
        eval_dataset=str(files["valid"]),
        student_config=str(files["student"]),
        device="cpu",
        out=tmp_path / "caches",
        results=tmp_path / "results",
    )
    rows = report["methods"]
    assert list(rows)[:2] == ["sft (ce)", "online full KD"]
    assert len(rows) == len(methods(Sizes()))
    for name, row in rows.items():
        for metric in ("ce", "kl", "top1"):
            assert set(row[metric]) == {"mean", "std"}, name
            assert row[metric]["mean"] == row[metric]["mean"], f"{name}: {metric} is NaN"
        assert row["kl"]["mean"] >= 0
        assert row["curve_steps"] == [0, 1, 2]
    check = report["checks"]["online_kd_vs_fkl_tail_at_k_eq_V"]
    assert check["abs_diff"] < 1e-6 and check["grad_max_abs_diff"] < 1e-6
    assert report["checks"]["teacher_top1_vs_cache_agreement"] > 0.99
    assert report["checks"]["teacher_lse_vs_cache_max_abs"] < 1e-3
    summary = report["summary"]
    assert set(summary["ce_gap_vs_online"]) == {"fkl @8", "fkl @64", "fkl-tail @64"}
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    assert "| fkl @64 |" in (tmp_path / "results" / "quality.md").read_text()
