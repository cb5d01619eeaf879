"""The losses on compact samples (format 3.0): only the draws outside the top-k are listed.

fkl-hybrid reads them exactly as it reads every draw; rskd spreads the unlisted draws inside
the top-k as their conditional expectation, which keeps it unbiased and lowers its variance; a
samples-only batch (k = 0) trains both.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses import LOSSES
from tests.student_trainer.test_loss_hybrid import full_kl, loss_and_grad, problem

hybrid, rskd = LOSSES["fkl-hybrid"].fn, LOSSES["rskd"].fn


def compact(cache: TeacherBatch) -> TeacherBatch:
    """The batch a format 3.0 cache gives for the same draws: those inside the top-k unlisted,
    `num_draws` saying how many there were."""
    assert cache.sample_ids is not None and cache.sample_counts is not None
    inside = (cache.sample_ids.unsqueeze(-1) == cache.ids.unsqueeze(1)).any(-1)
    n = int(cache.sample_counts.sum(-1)[0])
    return dataclasses.replace(
        cache, sample_counts=cache.sample_counts.masked_fill(inside, 0.0), num_draws=n
    )


def samples_only(cache: TeacherBatch) -> TeacherBatch:
    """The batch of a `--top-k 0` cache for the same draws."""
    n = int(cache.sample_counts.sum(-1)[0])
    empty = cache.ids[:, :0]
    return dataclasses.replace(
        cache,
        ids=empty,
        logprobs=cache.logprobs[:, :0],
        log_tail=torch.zeros_like(cache.log_tail),
        num_draws=n,
    )


def test_hybrid_reads_compact_samples_as_it_reads_every_draw():
    teacher_logits, student_logits, labels = problem()
    g = torch.Generator().manual_seed(3)
    cache = teacher_batch_from_logits(teacher_logits, labels, 4, num_samples=8, generator=g)
    full_value, full_grad = loss_and_grad(hybrid, cache, student_logits)
    value, grad = loss_and_grad(hybrid, compact(cache), student_logits)
    assert value == pytest.approx(full_value, rel=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-12)


def _gradients(fn, make, teacher_logits, student_logits, labels, k, caches=800):
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(caches):
        cache = teacher_batch_from_logits(teacher_logits, labels, k, num_samples=6, generator=g)
        grads.append(loss_and_grad(fn, make(cache), student_logits)[1])
    return torch.stack(grads)


def test_rskd_on_compact_samples_is_unbiased_and_steadier():
    """The unlisted draws inside the top-k, spread as (n - m) p_i / p_head, keep the mean
    gradient the full FKL's and take the head's sampling noise away."""
    teacher_logits, student_logits, labels = problem()
    z = student_logits.double().requires_grad_(True)
    (exact,) = torch.autograd.grad(full_kl(teacher_logits, z), z)
    rb = _gradients(rskd, compact, teacher_logits, student_logits, labels, k=4)
    plain = _gradients(rskd, lambda c: c, teacher_logits, student_logits, labels, k=4)
    mean, sem = rb.mean(0), rb.std(0) / len(rb) ** 0.5
    assert ((mean - exact).abs() <= 4 * sem + 1e-6).float().mean() > 0.99
    assert float(rb.var(0).sum()) < 0.7 * float(plain.var(0).sum())


def test_a_samples_only_batch_trains_hybrid_and_rskd_without_bias():
    """k = 0: both are the plain Monte-Carlo forward KL, unbiased."""
    teacher_logits, student_logits, labels = problem()
    z = student_logits.double().requires_grad_(True)
    (exact,) = torch.autograd.grad(full_kl(teacher_logits, z), z)
    for fn in (hybrid, rskd):
        grads = _gradients(fn, samples_only, teacher_logits, student_logits, labels, k=1)
        mean, sem = grads.mean(0), grads.std(0) / len(grads) ** 0.5
        assert ((mean - exact).abs() <= 4 * sem + 1e-6).float().mean() > 0.99, fn.__name__


def test_hybrid_weights_from_the_stored_tail_not_the_encoded_head():
    """An encoded head can sum above 1 (q8c rounds values up); P(m >= 1) then comes from the
    exact stored tail mass, so a rare tail draw cannot blow the loss up."""
    teacher_logits, student_logits, labels = problem(n=1, v=40)
    teacher_logits[0, 0] = 14.0  # a near-certain top-1: a tail mass of about 1e-5
    g = torch.Generator().manual_seed(0)
    cache = teacher_batch_from_logits(teacher_logits, labels, 4, num_samples=32, generator=g)
    tail_id = int(torch.ones(40).scatter(0, cache.ids[0], 0.0).nonzero()[0])
    cache = dataclasses.replace(
        cache,
        logprobs=cache.logprobs + 1e-3,  # the head as decoded: its mass rounds above 1
        sample_ids=torch.tensor([[tail_id]]),
        sample_counts=torch.tensor([[1.0]]),
        sample_logprobs=torch.log_softmax(teacher_logits.double(), -1)[:, [tail_id]].float(),
        num_draws=32,
    )
    value, grad = loss_and_grad(hybrid, cache, student_logits)
    assert abs(value) < 10 and float(grad.abs().max()) < 10
