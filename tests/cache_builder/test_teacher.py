"""The teacher: loading, packed rows without attention across documents, and its head."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cache_builder.loading import load_teacher
from cache_builder.teacher import Teacher, TeacherError, packed_position_ids
from cache_builder.topk import SignalOptions, TeacherSignals, teacher_signals_from_logits
from tests.fixtures.models import make_tokenizer, save_tiny_model

DOCS = [5, 9, 3]  # packed into row 0 of length 20 (3 positions of padding); row 1 holds one doc


@pytest.fixture(scope="module")
def teacher(tiny_llama_dir: Path) -> Teacher:
    return load_teacher(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 2: final-logit softcapping and a sliding window shorter than the documents."""
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        final_logit_softcapping=2.0,  # small, so the cap visibly bends the logits
        attn_logit_softcapping=None,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), config, seed=0)


def _docs(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(vocab, (n,), generator=g) for n in [*DOCS, 12]]


def _next_tokens(doc: torch.Tensor) -> torch.Tensor:
    return torch.cat([doc[1:], torch.tensor([-1])])  # no next token at a document's end


def _signals(t: Teacher, hidden: torch.Tensor, labels: torch.Tensor) -> TeacherSignals:
    return t.signals(
        hidden, labels, SignalOptions(k=8, temperatures=(2.0,), vocab_chunk=100, row_chunk=16)
    )


def test_loads_from_a_saved_dir(teacher: Teacher, tiny_llama_dir: Path):
    info = teacher.info
    assert info.name_or_path == str(tiny_llama_dir) and info.revision is None
    assert info.model_type == "llama" and info.dtype == "float32"
    assert info.num_parameters == sum(p.numel() for p in teacher.model.parameters())
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    expected = f"model.safetensors\0{hashlib.sha256(data).hexdigest()}\n".encode()
    assert info.weights_sha256 == "sha256:" + hashlib.sha256(expected).hexdigest()
    assert teacher.vocab_size == 384 and teacher.plain_head and teacher.logit_transform is None
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32
    weight, bias = teacher.lm_head()
    assert weight.shape == (384, 32) and bias is None
    assert not teacher.model.training
    with pytest.raises(Exception, match=r"frozen|cannot assign"):
        info.dtype = "bfloat16"  # type: ignore[misc]


def test_dtype_option(tiny_llama_dir: Path):
    t = load_teacher(tiny_llama_dir, dtype="bfloat16", device="cpu")
    assert t.dtype == torch.bfloat16 and t.info.dtype == "bfloat16"
    with pytest.raises(TeacherError, match="unknown teacher dtype"):
        load_teacher(tiny_llama_dir, dtype="int3")


def test_missing_path_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "no" / "such-teacher"
    with pytest.raises(TeacherError, match=r"does not exist.*Fix") as err:
        load_teacher(missing)
    assert str(missing) in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(TeacherError, match=r"no config\.json.*save_pretrained"):
        load_teacher(tmp_path)  # a directory, but not a model
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(TeacherError, match="is a file, not a model directory"):
        load_teacher(tmp_path / "weights.bin")


def test_config_without_weights(tmp_path: Path, tiny_llama_dir: Path):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(TeacherError, match=r"no weights could be loaded.*Fix"):
        load_teacher(tmp_path)


def test_remote_code_needs_trust_remote_code(tmp_path: Path):
    config = {
        "model_type": "kdcache-custom",
        "auto_map": {"AutoConfig": "config.C", "AutoModelForCausalLM": "model.M"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match=r"trust_remote_code=True") as err:
        load_teacher(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_position_ids_restart_per_document(teacher: Teacher):
    assert packed_position_ids([[3, 2], [4]], 6).tolist() == [
        [0, 1, 2, 0, 1, 0],  # two documents, then one position of padding
        [0, 1, 2, 3, 0, 1],
    ]
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    hook = teacher.model.base_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        teacher.hidden_states(torch.zeros(2, 6, dtype=torch.int64), seq_lens=[[3, 2], [4]])
    finally:
        hook.remove()
    assert seen["position_ids"].tolist() == packed_position_ids([[3, 2], [4]], 6).tolist()
    assert seen.get("attention_mask") is None  # so transformers derives the per-document mask
    with pytest.raises(ValueError, match="sum to at most"):
        teacher.hidden_states(torch.zeros(1, 6, dtype=torch.int64), seq_lens=[[4, 3]])
    with pytest.raises(ValueError, match="restart at 0"):
        teacher.hidden_states(
            torch.zeros(1, 6, dtype=torch.int64),
            position_ids=torch.arange(6).unsqueeze(0),
            seq_lens=[[3, 3]],
        )


@pytest.mark.parametrize(("model", "attn"), [("llama", None), ("llama", "eager"), ("gemma2", None)])
def test_packed_document_matches_it_alone(model, attn, tiny_llama_dir, tiny_gemma2_dir):
    """The acceptance test for packing: a document's signals do not depend on its neighbours."""
    t = load_teacher(
        tiny_llama_dir if model == "llama" else tiny_gemma2_dir, attn_implementation=attn
    )
    docs = _docs(t.vocab_size)
    length = 20
    rows = torch.zeros(2, length, dtype=torch.int64)
    rows[0, : sum(DOCS)] = torch.cat(docs[:3])
    rows[1, :12] = docs[3]
    hidden = t.hidden_states(rows, seq_lens=[DOCS, [12]])  # (2, 20, d)
    assert hidden.shape == (2, length, t.model.config.hidden_size)
    starts = [(0, 0), (0, 5), (0, 14), (1, 0)]
    for doc, (row, start) in zip(docs, starts, strict=True):
        packed = hidden[row, start : start + len(doc)]
        alone = t.hidden_states(doc.unsqueeze(0))[0]
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        a = _signals(t, packed, _next_tokens(doc))
        b = _signals(t, alone, _next_tokens(doc))
        assert torch.equal(a.topk_ids, b.topk_ids)
        for name in ("topk_logprobs", "lse", "log_tail", "label_logprob", "temp_lse"):
            torch.testing.assert_close(
                getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, equal_nan=True
            )


def test_check_catches_attention_across_documents(teacher: Teacher, monkeypatch):
    def leaky(input_ids, position_ids=None, seq_lens=None):
        # a model that ignores document boundaries: one causal sequence per row
        body = teacher.model.base_model
        return body(input_ids=input_ids, use_cache=False).last_hidden_state

    monkeypatch.setattr(teacher, "hidden_states", leaky)
    with pytest.raises(TeacherError, match=r"attention crosses documents.*Fix"):
        teacher.check()


def test_head_paths_agree_with_the_models_own_logits(teacher: Teacher):
    doc = _docs(teacher.vocab_size)[3]
    labels = _next_tokens(doc)
    hidden = teacher.hidden_states(doc.unsqueeze(0))[0]  # (12, d)
    own = teacher.model(input_ids=doc.unsqueeze(0), use_cache=False).logits[0]
    chunked = _signals(teacher, hidden, labels)
    reference = teacher_signals_from_logits(own, labels, SignalOptions(k=8, temperatures=(2.0,)))
    teacher.plain_head = False  # force the fallback: the model's own head on row chunks
    try:
        fallback = teacher.signals(
            hidden, labels, SignalOptions(k=8, temperatures=(2.0,), row_chunk=5)
        )
    finally:
        teacher.plain_head = True
    for other in (reference, fallback):
        assert torch.equal(chunked.topk_ids, other.topk_ids)
        for name in ("topk_logprobs", "lse", "log_tail", "label_logprob", "temp_lse"):
            torch.testing.assert_close(getattr(chunked, name), getattr(other, name), equal_nan=True)


def test_softcapped_logits(tiny_gemma2_dir: Path):
    t = load_teacher(tiny_gemma2_dir)  # check() compares with the model's own forward
    assert t.logit_transform is not None and t.info.model_type == "gemma2"
    doc = _docs(t.vocab_size)[1]
    own = t.model(input_ids=doc.unsqueeze(0), use_cache=False).logits[0]
    assert own.abs().max() < 2.0  # the cap is in force
    hidden = t.hidden_states(doc.unsqueeze(0))[0]
    s = t.signals(hidden, _next_tokens(doc), SignalOptions(k=5, vocab_chunk=64))
    ref = teacher_signals_from_logits(own, _next_tokens(doc), SignalOptions(k=5))
    assert torch.equal(s.topk_ids, ref.topk_ids)
    torch.testing.assert_close(s.lse, ref.lse)
    torch.testing.assert_close(s.log_tail, ref.log_tail)


def test_tokenizer_saved_beside_the_model(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert len(tok) == 384 and tok.eos_token == tok.pad_token == "<|endoftext|>"
    ids = tok("def answer(x):\n    return 42").input_ids
    assert tok.decode(ids) == "def answer(x):\n    return 42"
    assert make_tokenizer(384).get_vocab() == tok.get_vocab()


def test_unsupported_attention_implementation(tiny_gemma2_dir: Path):
    with pytest.raises(TeacherError, match=r"attn_implementation='sdpa' is not supported.*Fix"):
        load_teacher(tiny_gemma2_dir, attn_implementation="sdpa")


def test_flash_layout_flattens_rows_with_cu_seq_lens(teacher: Teacher):
    """Flash kernels go varlen only for one flattened sequence with cu_seq_lens given."""
    docs = _docs(teacher.vocab_size)
    rows = torch.zeros(2, 20, dtype=torch.int64)
    rows[0, : sum(DOCS)] = torch.cat(docs[:3])
    rows[1, :12] = docs[3]
    expected = teacher.hidden_states(rows, seq_lens=[DOCS, [12]])
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    hook = teacher.model.base_model.register_forward_pre_hook(grab, with_kwargs=True)
    teacher._varlen = True  # what a flash attn_implementation selects (sdpa reads the same ids)
    try:
        flat = teacher.hidden_states(rows, seq_lens=[DOCS, [12]])
    finally:
        teacher._varlen = False
        hook.remove()
    assert seen["input_ids"].shape == (1, 40)
    assert seen["cu_seq_lens_q"].tolist() == [0, 5, 14, 17, 20, 32, 40]
    assert seen["cu_seq_lens_q"].dtype == torch.int32 and seen["max_length_q"] == 12
    assert torch.equal(seen["position_ids"], packed_position_ids([DOCS, [12]], 20).reshape(1, 40))
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_teacher_packs_documents(tiny_llama_dir: Path):
    t = load_teacher(tiny_llama_dir, device="cuda")  # dtype auto: bfloat16 on CUDA
    assert t.dtype == torch.bfloat16 and t.device.type == "cuda"
    docs = _docs(t.vocab_size)
    rows = torch.zeros(1, 20, dtype=torch.int64)
    rows[0, : sum(DOCS)] = torch.cat(docs[:3])
    hidden = t.hidden_states(rows, seq_lens=[DOCS])
    doc = docs[1]
    packed = _signals(t, hidden[0, 5:14], _next_tokens(doc).cuda())
    alone = _signals(t, t.hidden_states(doc.unsqueeze(0))[0], _next_tokens(doc).cuda())
    torch.testing.assert_close(packed.lse, alone.lse, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(packed.label_logprob, alone.label_logprob, rtol=2e-2, atol=5e-2)
