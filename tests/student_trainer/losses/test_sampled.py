"""RS-KD against a dense reference, and its gradient against q - p over many draws."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from student_trainer.batch import TeacherBatch, teacher_batch_from_logits
from student_trainer.losses import sampled
from student_trainer.losses._student import ChunkedStudent, DenseStudent, StudentLogits


def _teacher(
    z: Tensor, num_samples: int, sample_temperature: float = 1.0, seed: int = 0
) -> TeacherBatch:
    return teacher_batch_from_logits(
        z,
        torch.zeros(z.shape[0], dtype=torch.long),
        2,
        num_samples=num_samples,
        sample_temperature=sample_temperature,
        generator=torch.Generator().manual_seed(seed),
    )


def _reference(z: Tensor, s: Tensor, teacher: TeacherBatch, temperature: float) -> Tensor:
    """T^2 * -sum_u p~_u log q_u, with p~ ∝ c p_T / r from the dense teacher (mean over rows)."""
    z, s = z.double(), s.double()
    p_t = torch.softmax(z / temperature, -1).gather(-1, teacher.sample_ids)
    r = torch.softmax(z / teacher.sample_temperature, -1).gather(-1, teacher.sample_ids)
    w = teacher.sample_counts.double() * p_t / r
    p_tilde = w / w.sum(-1, keepdim=True)
    log_q = torch.log_softmax(s / temperature, -1).gather(-1, teacher.sample_ids)
    return temperature**2 * -(p_tilde * log_q).sum(-1).mean()


def test_needs_samples() -> None:
    teacher = teacher_batch_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="--samples"):
        sampled.rskd(DenseStudent(torch.randn(2, 5)), teacher)
    assert sampled.SPECS["rskd"].needs_samples


@pytest.mark.parametrize(
    ("sample_temperature", "temperature"),
    [(1.0, 1.0), (1.5, 1.0), (1.0, 2.0), (0.8, 0.8), (2.0, 0.5)],
)
def test_matches_dense_reference(sample_temperature: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn(6, 11, generator=g) * 2, torch.randn(6, 11, generator=g) * 2
    teacher = _teacher(z, 12, sample_temperature)
    stats: dict[str, Tensor] = {}
    got = sampled.rskd(DenseStudent(s), teacher, temperature=temperature, stats=stats)
    want = _reference(z, s, teacher, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    unique = (teacher.sample_counts > 0).sum(-1).float().mean()
    torch.testing.assert_close(stats["rskd/unique_ids"], unique)
    assert stats["rskd/self_normalized"].item() == float(temperature != sample_temperature)


def test_untempered_weights_are_counts_over_draws() -> None:
    """With t = T = 1 the target is c_u / n whatever the teacher log-probs say."""
    g = torch.Generator().manual_seed(2)
    z, s = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    teacher = _teacher(z, 20)
    scrambled = dataclasses.replace(
        teacher, sample_logprobs=torch.randn_like(teacher.sample_logprobs)
    )
    log_q = torch.log_softmax(s, -1).gather(-1, teacher.sample_ids)
    want = -((teacher.sample_counts / 20) * log_q).sum(-1).mean()
    torch.testing.assert_close(sampled.rskd(DenseStudent(s), scrambled), want)


def test_padding_contributes_nothing() -> None:
    g = torch.Generator().manual_seed(3)
    z, s = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g, requires_grad=True)
    teacher = _teacher(z, 5)
    padded = dataclasses.replace(
        teacher,
        sample_ids=torch.cat([teacher.sample_ids, torch.full((3, 4), 7)], -1),
        sample_counts=torch.cat([teacher.sample_counts, torch.zeros(3, 4)], -1),
        sample_logprobs=torch.cat([teacher.sample_logprobs, torch.full((3, 4), -50.0)], -1),
        sample_temperature=1.3,
    )
    base = dataclasses.replace(teacher, sample_temperature=1.3)
    got = sampled.rskd(DenseStudent(s), padded)
    torch.testing.assert_close(got, sampled.rskd(DenseStudent(s), base))
    (grad,) = torch.autograd.grad(got, s)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("sample_temperature", "temperature", "draws", "atol"),
    [(1.0, 1.0, 12, 0.012), (2.0, 2.0, 12, 0.012), (1.5, 1.0, 200, 0.01)],
)
def test_mean_gradient_converges_to_q_minus_p(
    sample_temperature: float, temperature: float, draws: int, atol: float
) -> None:
    """E[grad] = T (q_T - p_T): unbiased when T = t; self-normalised (O(1/n) bias) otherwise."""
    rows, v = 3000, 8
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, v, generator=g) * 1.5
    s = torch.randn(v, generator=g, requires_grad=True)
    teacher = _teacher(z.expand(rows, v), draws, sample_temperature, seed=5)
    loss = sampled.rskd(DenseStudent(s.expand(rows, v)), teacher, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, s)
    q_t = torch.softmax(s.detach() / temperature, -1)
    p_t = torch.softmax(z[0] / temperature, -1)
    torch.testing.assert_close(grad, temperature * (q_t - p_t), rtol=0.0, atol=atol)
    # one draw set alone is far noisier than the average: the test can tell the two apart
    (one,) = torch.autograd.grad(
        sampled.rskd(
            DenseStudent(s[None]), teacher.select(torch.tensor([0])), temperature=temperature
        ),
        s,
    )
    assert (one - temperature * (q_t - p_t)).abs().max() > atol


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_gradcheck_float64(temperature: float) -> None:
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 7, generator=g, dtype=torch.float64)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = _teacher(z, 6, 1.2)
    teacher = dataclasses.replace(
        teacher,
        sample_counts=teacher.sample_counts.double(),
        sample_logprobs=torch.log_softmax(z, -1).gather(-1, teacher.sample_ids),
    )

    def fn(s: Tensor) -> Tensor:
        return sampled.rskd(DenseStudent(s), teacher, temperature=temperature)

    assert fn(s).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_student_gives_the_same_loss_and_gradients(temperature: float) -> None:
    g = torch.Generator().manual_seed(7)
    n, v, d = 7, 19, 5
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).requires_grad_()
    teacher = _teacher(torch.randn(n, v, generator=g) * 2, 10, 1.3)

    def run(student: StudentLogits) -> tuple[Tensor, ...]:
        loss = sampled.rskd(student, teacher, temperature=temperature)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    chunked = run(ChunkedStudent(h, w, vocab_chunk=4, row_chunk=3))
    for got, want in zip(chunked, run(DenseStudent(h @ w.T)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
