"""fkl-hybrid (exact head, sampled tail): unbiased for the full forward KL and its gradient,
exact when the tail is empty, fkl-tail's bucket where no draw fell in the tail, and of lower
gradient variance than RS-KD on the same draws."""

from __future__ import annotations

import pytest
import torch

from student_trainer.batch import teacher_batch_from_logits
from student_trainer.losses import LOSSES
from student_trainer.losses._student import DenseStudent

hybrid, fkl_tail, rskd = (LOSSES[name].fn for name in ("fkl-hybrid", "fkl-tail", "rskd"))


def problem(seed: int = 0, n: int = 6, v: int = 40):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(n, v, generator=g) * 1.5
    student_logits = torch.randn(n, v, generator=g)
    labels = torch.randint(v, (n,), generator=g)
    return teacher_logits, student_logits, labels


def full_kl(teacher_logits, student_logits):
    log_p = teacher_logits.double().log_softmax(-1)
    log_q = student_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def loss_and_grad(fn, teacher, student_logits):
    z = student_logits.clone().double().requires_grad_(True)
    value = fn(DenseStudent(z), teacher)
    (grad,) = torch.autograd.grad(value, z)
    return float(value), grad


def test_unbiased_for_the_full_kl_and_its_gradient():
    """Averaged over many independently drawn caches, value and gradient are the full FKL's."""
    teacher_logits, student_logits, labels = problem()
    z = student_logits.double().requires_grad_(True)
    exact = full_kl(teacher_logits, z)
    (exact_grad,) = torch.autograd.grad(exact, z)
    g = torch.Generator().manual_seed(1)
    values, grads = [], []
    for _ in range(800):
        cache = teacher_batch_from_logits(teacher_logits, labels, 4, num_samples=6, generator=g)
        value, grad = loss_and_grad(hybrid, cache, student_logits)
        values.append(value)
        grads.append(grad)
    grads = torch.stack(grads)
    mean, sem = grads.mean(0), grads.std(0) / len(grads) ** 0.5
    assert ((mean - exact_grad).abs() <= 4 * sem + 1e-6).float().mean() > 0.99
    assert abs(sum(values) / len(values) - float(exact)) < 4 * torch.tensor(values).std() / 800**0.5
    # a biased estimator fails the same test: fkl-tail's gradient is not q - p on the tail
    tail_grad = loss_and_grad(fkl_tail, cache, student_logits)[1]
    assert not torch.allclose(tail_grad, exact_grad, atol=1e-3)


def test_exact_when_the_tail_is_empty():
    teacher_logits, student_logits, labels = problem(v=12)
    cache = teacher_batch_from_logits(teacher_logits, labels, 12, num_samples=4)
    value, _ = loss_and_grad(hybrid, cache, student_logits)
    assert value == pytest.approx(float(full_kl(teacher_logits, student_logits)), rel=1e-5)


def test_rows_without_a_tail_draw_take_the_fkl_tail_bucket():
    """With every draw inside the top-k, the loss is fkl-tail exactly (value and gradient)."""
    teacher_logits, student_logits, labels = problem()
    cache = teacher_batch_from_logits(teacher_logits, labels, 4, num_samples=6)
    inside = cache.ids[:, :1].expand_as(cache.sample_ids).clone()  # every draw: the top-1 id
    cache = type(cache)(
        **{
            **{f: getattr(cache, f) for f in cache.__dataclass_fields__},
            "sample_ids": inside,
            "sample_logprobs": cache.logprobs[:, :1].expand_as(inside).clone(),
        }
    )
    stats: dict = {}
    z = student_logits.double().requires_grad_(True)
    a = hybrid(DenseStudent(z), cache, stats=stats)
    b = fkl_tail(DenseStudent(z), cache)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(*(torch.autograd.grad(x, z)[0] for x in (a, b)))
    assert (
        float(stats["fkl-hybrid/bucket_rows"]) == 1.0 and float(stats["fkl-hybrid/tail_draws"]) == 0
    )


def test_lower_gradient_variance_than_rskd_on_the_same_draws():
    teacher_logits, student_logits, labels = problem(seed=3)
    g = torch.Generator().manual_seed(2)
    spread = {"hybrid": [], "rskd": []}
    for _ in range(300):
        cache = teacher_batch_from_logits(teacher_logits, labels, 8, num_samples=16, generator=g)
        spread["hybrid"].append(loss_and_grad(hybrid, cache, student_logits)[1])
        spread["rskd"].append(loss_and_grad(rskd, cache, student_logits)[1])
    var = {k: torch.stack(v).var(0).sum() for k, v in spread.items()}
    assert var["hybrid"] < 0.5 * var["rskd"], var


def test_refuses_caches_it_cannot_use():
    teacher_logits, student_logits, labels = problem()
    with pytest.raises(ValueError, match="--samples"):
        hybrid(DenseStudent(student_logits), teacher_batch_from_logits(teacher_logits, labels, 4))
    tempered = teacher_batch_from_logits(
        teacher_logits, labels, 4, num_samples=4, sample_temperature=2.0
    )
    with pytest.raises(ValueError, match="sample temperature 1"):
        hybrid(DenseStudent(student_logits), tempered)


def test_kdcache_train_runs_it_and_refuses_tempered_draws(tiny_llama_dir, tmp_path):
    from cache_builder import build
    from tests.fixtures.caches import pydoc_jsonl, small_build_config
    from tests.fixtures.cli import kdcache, one_line_error

    data = pydoc_jsonl(tmp_path / "docs.jsonl", 4, 1000)
    for name, t in (("plain", 1.0), ("tempered", 2.0)):
        build(
            small_build_config(
                tiny_llama_dir, data, tmp_path / name, samples=8, sample_temperature=t
            )
        )
    args = ["train", "--student", str(tiny_llama_dir), "--max-steps", "2", "--no-progress"]
    args += ["--loss", "fkl-hybrid"]
    done = kdcache(*args, "--cache", str(tmp_path / "plain"), "--out", str(tmp_path / "run"))
    assert "trained 2 steps" in done.stdout
    refused = kdcache(
        *args, "--cache", str(tmp_path / "tempered"), "--out", str(tmp_path / "r2"), check=False
    )
    line = one_line_error(refused)
    assert "drawn at temperature 1" in line and "--sample-temperature 1" in line
