"""`bench.quality` end to end on a tiny random Llama: every method trains through the one bench
loop, in worker processes or in this one alike, the report has its shape (the frontier
included), and the online-KD loss is the dense full forward KL."""

import json
from pathlib import Path

import pytest
import torch

from bench.quality import (
    LONG,
    QUICK,
    QUICK_LONG,
    Sizes,
    best_within,
    check_online_equals_registry,
    check_order,
    methods,
    online_fkl,
    pareto,
    run,
)
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


def _quick(files: dict[str, Path], teacher: Path, out: Path, **kw) -> dict:
    return run(
        quick=True,
        seeds=(0,),
        steps=2,
        long_steps=4,
        eval_tokens=256,
        teacher=str(teacher),
        dataset=str(files["train"]),
        eval_dataset=str(files["valid"]),
        student_config=str(files["student"]),
        device="cpu",
        out=out / "caches",
        **kw,
    )


@pytest.fixture(scope="module")
def study(tiny_llama_dir: Path, files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick study on two worker processes; its results folder."""
    folder = tmp_path_factory.mktemp("quality-study")
    report = _quick(files, tiny_llama_dir, folder, jobs=2, results=folder / "results")
    (folder / "report.json").write_text(json.dumps(report, default=str))
    return folder


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


def test_the_frontier_grid() -> None:
    rows = methods(Sizes())
    names = [m.name for m in rows]
    assert names[:2] == ["sft (ce)", "online full KD"] and len(set(names)) == len(names)
    assert len(rows) == 2 + 2 * 5 + 4 + 4 * 3
    assert {"fkl @8", "fkl-tail @128", "rskd (64 samples)", "fkl-hybrid @64 (32 samples)"} <= {
        *names
    }
    assert {m.loss for m in rows} == {"ce", None, "fkl", "fkl-tail", "rskd", "fkl-hybrid"}
    for m in rows[2:]:  # every method reads the cache of its own (k, samples)
        assert m.cache == f"k{m.top_k}-s{m.samples}" and m.top_k + m.samples > 0
    assert {m.name for m in LONG} <= set(names)
    assert {m.name for m in methods(QUICK)} >= {"fkl @8", "rskd (8 samples)"}


def test_every_registered_loss_is_a_method_of_the_full_roster() -> None:
    rows = methods(Sizes(), roster="all")
    losses = {m.loss for m in rows}
    assert losses >= set(LOSSES) - {"z-loss"} and None in losses
    assert {m.name for m in rows} >= {"fkl @8", "fkl @64", "fkl-tail @64", "bild @8", "dkd @64"}


def test_pareto_and_budgets() -> None:
    points = [
        {"method": "a", "bytes_per_token": 10.0, "gap": 0.05},
        {"method": "b", "bytes_per_token": 10.0, "gap": 0.03},  # same bytes, lower gap
        {"method": "c", "bytes_per_token": 20.0, "gap": 0.04},  # more bytes, no better
        {"method": "d", "bytes_per_token": 40.0, "gap": 0.01},
        {"method": "e", "bytes_per_token": 80.0, "gap": float("nan")},
    ]
    assert pareto(points) == ["b", "d"]
    assert best_within(points, 9.0) is None
    assert best_within(points, 30.0) == "b"
    assert best_within(points, 1000.0) == "d"


def test_the_data_order_check_compares_the_steps_runs_share() -> None:
    check_order({("a", 0): ["x", "y"], ("b", 0): ["x", "y", "z"], ("c", 1): ["w"]})
    with pytest.raises(AssertionError, match="b, seed 0: step 2"):
        check_order({("a", 0): ["x", "y", "z"], ("b", 0): ["x", "q"]})


def test_quick_study_on_a_tiny_model(study: Path) -> None:
    report = json.loads((study / "report.json").read_text())
    rows = report["methods"]
    assert list(rows)[:2] == ["sft (ce)", "online full KD"]
    assert list(rows) == [m.name for m in methods(QUICK)]
    for name, row in rows.items():
        for metric in ("ce", "kl", "top1"):
            assert set(row[metric]) == {"mean", "std"}, name
            assert row[metric]["mean"] == row[metric]["mean"], f"{name}: {metric} is NaN"
        assert row["kl"]["mean"] >= 0
        assert row["curve_steps"] == [0, 1, 2]
        if row["family"] == "reference":
            assert row["bytes_per_token"] is None and row["samples"] is None
        else:
            assert row["bytes_per_token"] > 0, name
    check = report["checks"]["online_kd_vs_fkl_tail_at_k_eq_V"]
    assert check["abs_diff"] < 1e-6 and check["grad_max_abs_diff"] < 1e-6
    assert report["checks"]["teacher_top1_vs_cache_agreement"] > 0.99
    assert report["checks"]["teacher_lse_vs_cache_max_abs"] < 1e-3

    summary = report["summary"]
    points = summary["frontier"]
    assert {p["method"] for p in points} == {n for n, r in rows.items() if r["k"] is not None}
    assert all(p["bytes_per_token"] > 0 for p in points)
    front = summary["pareto"]
    assert front and set(front) <= set(rows)
    spent = [rows[name]["bytes_per_token"] for name in front]
    assert spent == sorted(spent)
    gaps = [rows[name]["ce_gap_vs_online"]["mean"] for name in front]
    assert gaps == sorted(gaps, reverse=True)
    default = summary["default_cache"]
    assert default["top_k"] == 64 and default["bytes_per_token"] > 0
    best = summary["best_within_default_bytes"]
    assert best in rows and rows[best]["bytes_per_token"] <= default["bytes_per_token"]
    assert summary["goal_within_half_percent"] == (rows[best]["ce_gap_vs_online"]["mean"] <= 0.005)
    assert set(summary["by_budget"]) == {"32", "64", "128", "256"}
    for budget, name in summary["by_budget"].items():
        assert name is None or rows[name]["bytes_per_token"] <= int(budget)

    long = report["long"]
    assert long["settings"]["steps"] == 4 and long["settings"]["seeds"] == [0]
    assert list(long["methods"]) == [m.name for m in QUICK_LONG]
    assert all(r["curve_steps"][-1] == 4 for r in long["methods"].values())

    for name in ("quality.json", "quality.md", "quality.png", "quality-frontier.png"):
        assert (study / "results" / name).stat().st_size > 0
    text = (study / "results" / "quality.md").read_text()
    assert "| fkl @8 | 8 | 0 |" in text and "Pareto front" in text and "## Long setting" in text


def test_parallel_runs_equal_a_serial_run(
    study: Path, tiny_llama_dir: Path, files, tmp_path: Path
) -> None:
    """The same final scores from this process as from the two workers (same caches)."""
    parallel = json.loads((study / "report.json").read_text())["methods"]
    serial = _quick(
        files,
        tiny_llama_dir,
        study,
        jobs=1,
        long=False,
        only=("fkl @8",),
        results=None,
    )["methods"]
    assert set(serial) == {"sft (ce)", "online full KD", "fkl @8"}
    for name, row in serial.items():
        assert row["runs"]["0"]["final"] == parallel[name]["runs"]["0"]["final"], name
