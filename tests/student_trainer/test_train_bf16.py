"""`train()` with bf16 autocast (on CPU; on CUDA where there is one): the student's body runs in
bf16, while the master weights, the optimizer and the loss (the student's log-sum-exp and its
logits at the cached ids) stay float32."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer import TrainConfig, train

pytestmark = pytest.mark.integration

train_module = importlib.import_module("student_trainer.train")  # the module, not the function
objective_module = importlib.import_module("student_trainer.objective")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("loss", "measure"), [("fkl", "eval_kl_topk"), ("ce", "eval_ce")])
def test_bf16_autocast_learns_with_fp32_weights_and_loss(
    small_cache: str,
    fresh_student: str,
    tmp_path: Path,
    monkeypatch,
    loss: str,
    measure: str,
    device: str,
) -> None:
    seen: dict[str, set[torch.dtype]] = {
        "body": set(),
        "lse": set(),
        "gather": set(),
        "loss": set(),
    }
    initial: dict[str, torch.Tensor] = {}

    real_load = train_module.load_student

    def load_and_watch(cfg, cache):
        model, tokenizer, what = real_load(cfg, cache)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        # A linear layer of the body: under autocast its output is bf16.
        model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda module, args, out: seen["body"].add(out.dtype)
        )
        return model, tokenizer, what

    real_loss = objective_module.loss_of

    def loss_and_watch(spec, options, cfg, student, teacher, aux, stats):
        value = real_loss(spec, options, cfg, student, teacher, aux, stats)
        if torch.is_grad_enabled():  # training steps, not evaluation
            seen["lse"].add(student.lse().dtype)
            seen["gather"].add(student.gather(teacher.ids).dtype)
            seen["loss"].add(value.dtype)
        return value

    monkeypatch.setattr(train_module, "load_student", load_and_watch)
    monkeypatch.setattr(objective_module, "loss_of", loss_and_watch)
    out = tmp_path / loss
    result = train(
        TrainConfig(
            cache=small_cache,
            out=str(out),
            student_config=fresh_student,
            loss=loss,
            bf16=True,
            device=device,
            max_steps=12,
            lr=1e-2,
            warmup_steps=1,
            batch_tokens=192,
            log_every=1,
            eval_cache=small_cache,
            eval_tokens=384,
            progress=False,
        )
    )

    assert seen["body"] == {torch.bfloat16}, "autocast must run the student's body in bf16"
    assert seen["lse"] == seen["gather"] == seen["loss"] == {torch.float32}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert len(train_losses) == 12 and all(math.isfinite(x) for x in train_losses)
    evals = [r[measure] for r in rows if measure in r]
    assert len(evals) == 2 and evals[1] < 0.9 * evals[0], evals
    assert result.final_loss == train_losses[-1]

    final = load_file(out / "student" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}, "master weights stay float32"
    moved = [k for k in final if not torch.equal(final[k], initial[k])]
    assert "lm_head.weight" in moved and "model.layers.0.mlp.down_proj.weight" in moved
    optimizer_state = torch.load(out / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in optimizer_state.values()} == {torch.float32}
