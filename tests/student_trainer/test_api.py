"""The public API (`student_trainer.api`): the dataset, the collator, `kd_loss` and
`check_student`, against `kdcache train` and against each other; the plain-loop example runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache_builder import build
from schemas import open_cache
from schemas.errors import ConfigError, IncompatibleCacheError
from student_trainer import (
    KDCollator,
    LossSettings,
    cache_dataset,
    check_student,
    kd_loss,
    kd_loss_from_logits,
)
from student_trainer.batch import teacher_batch_from_logits
from tests.fixtures.caches import pydoc_jsonl, small_build_config
from tests.fixtures.cli import ENV, kdcache
from tests.fixtures.models import make_tokenizer, tiny_student_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> str:
    root = tmp_path_factory.mktemp("api")
    data = pydoc_jsonl(root / "docs.jsonl", 8, 1200)
    build(small_build_config(tiny_llama_dir, data, root / "cache", samples=4))
    return str(root / "cache")


def test_collator_aligns_the_teacher_with_the_next_token(cache_url):
    cache = open_cache(cache_url)
    loader = torch.utils.data.DataLoader(
        cache_dataset(cache_url, batch_tokens=512), batch_size=None, collate_fn=KDCollator(cache)
    )
    batch = next(iter(loader))
    ids, rows, teacher = batch["input_ids"], batch["kd_rows"], batch["kd_teacher"]
    assert torch.equal(teacher.labels, ids.flatten()[rows + 1])  # row t learns token t + 1
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert teacher.ids.shape == (rows.shape[0], cache.layout.k)
    assert teacher.sample_ids is not None  # the cache's samples come along
    assert batch["input_ids"].shape[0] * batch["input_ids"].shape[1] >= 512 // 2


def test_dataset_resumes_from_its_state(cache_url):
    whole = list(cache_dataset(cache_url, seed=3, batch_tokens=300))
    first = cache_dataset(cache_url, seed=3, batch_tokens=300)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    resumed = cache_dataset(cache_url, seed=3, batch_tokens=300)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(whole) > 4
    flat = lambda groups: [s.arrays["input_ids"].tolist() for g in groups for s in g]  # noqa: E731
    assert flat(head + rest) == flat(whole)
    with pytest.raises(ValueError, match="seed"):
        cache_dataset(cache_url, seed=4).load_state_dict(state)


LOSSES = ["fkl-tail", "fkl", "rkl", "jsd", "dkd", "rskd"]


@pytest.mark.parametrize("loss", LOSSES)
def test_kd_loss_from_hidden_states_equals_the_logits_form(loss):
    g = torch.Generator().manual_seed(0)
    n, d, v = 40, 16, 300
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g) * 0.3
    weight.requires_grad_(True)
    teacher = teacher_batch_from_logits(
        torch.randn(n, v, generator=g) * 2,
        torch.randint(v, (n,), generator=g),
        8,
        num_samples=6,
        generator=g,
    )
    settings = LossSettings(vocab_chunk=64, logit_block=v * 16)  # several blocks and chunks
    lean, terms = kd_loss(hidden, weight, teacher, loss, settings=settings)
    (g_h, g_w) = torch.autograd.grad(lean, (hidden, weight))
    dense, dense_terms = kd_loss_from_logits(hidden @ weight.T, teacher, loss)
    (d_h, d_w) = torch.autograd.grad(dense, (hidden, weight))
    torch.testing.assert_close(lean, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, d_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, d_w, rtol=1e-4, atol=1e-6)
    assert terms.keys() == dense_terms.keys()


def test_kd_loss_refuses_what_it_cannot_do():
    teacher = teacher_batch_from_logits(torch.randn(4, 10), torch.zeros(4, dtype=torch.int64), 3)
    with pytest.raises(ConfigError, match="unknown loss"):
        kd_loss(torch.randn(4, 2), torch.randn(10, 2), teacher, "nope")
    with pytest.raises(ConfigError, match="rows="):
        kd_loss(torch.randn(1, 4, 2), torch.randn(10, 2), teacher)
    with pytest.raises(ConfigError, match="5 student positions for 4"):
        kd_loss(torch.randn(5, 2), torch.randn(10, 2), teacher)


def test_the_api_computes_what_kdcache_train_computes(cache_url, tmp_path):
    """Step 1 of `kdcache train` logs the loss before its update: the same student, the same
    first micro-batch and `kd_loss` must give that number."""
    student = tiny_student_config(tmp_path)
    out = tmp_path / "run"
    kdcache(
        "train", "--cache", cache_url, "--student-config", str(student), "--out", str(out),
        "--loss", "fkl-tail", "--max-steps", "1", "--batch-tokens", "400", "--seed", "5",
        "--no-progress",
    )  # fmt: skip
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(student.read_text()))
    torch.manual_seed(5)  # as kdcache train seeds a fresh student
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    cache = open_cache(cache_url)
    data = cache_dataset(cache_url, seed=5, batch_tokens=400)
    batch = KDCollator(cache)(next(iter(data)))
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    loss, _ = kd_loss(
        hidden, model.lm_head.weight, batch["kd_teacher"], "fkl-tail", rows=batch["kd_rows"]
    )
    assert float(loss.detach()) == pytest.approx(logged["loss"], rel=1e-5)


def test_check_student_gives_the_train_error(cache_url, tiny_llama_dir):
    from transformers import AutoTokenizer

    check_student(cache_url, AutoTokenizer.from_pretrained(tiny_llama_dir))
    with pytest.raises(IncompatibleCacheError, match="tokenizer"):
        check_student(cache_url, make_tokenizer(300))


def test_plain_loop_example_runs(cache_url):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_loop.py"), cache_url, "--steps", "6",
         "--batch-tokens", "512"],
        env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if "loss" in line]
    assert len(losses) == 6 and all(map(lambda x: x == x and x < 1e3, losses))
    assert losses[-1] < losses[0]
