"""The teacher: a Hugging Face causal LM run over packed rows of documents.

A packed row holds several documents back to back (then padding). Position ids restart at 0
for every document, and attention never crosses a document: transformers (>= 4.53, checked on
5.23) reads exactly that layout from the position ids. With `attention_mask=None`, no cache
and per-document position ids, `masking_utils.create_causal_mask` finds the packed sequences
(`find_packed_sequence_indices`) and builds a block-diagonal causal mask for sdpa, eager and
flex attention, sliding windows included. Flash attention only goes varlen for a batch of one,
so for it the rows are flattened into one sequence and `cu_seq_lens` are passed explicitly.
`load_teacher` then proves it on the loaded model: one document's hidden states must not move
when the document packed before it changes, and must match the document run alone.

The logits are `lm_head(final hidden states)`, optionally followed by an elementwise transform
read from the config (logit softcapping, logit scale). `Teacher.signals` walks the vocabulary
in chunks through the lm_head weight when the head is a plain `nn.Linear`, and otherwise calls
the model's own head on row chunks. `load_teacher` checks that either way reproduces the
model's own logits.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cache_builder.topk import (
    SignalOptions,
    TeacherSignals,
    teacher_signals,
    teacher_signals_from_logits,
)
from cache_builder.vocab_parallel import VocabSlices, vocab_parallel_signals
from schemas.errors import KdcacheError

__all__ = ["Teacher", "TeacherError", "TeacherInfo", "packed_position_ids"]


class TeacherError(KdcacheError, ValueError):
    """The teacher cannot be loaded or used as asked; the message says how to fix it."""


@dataclass(frozen=True)
class TeacherInfo:
    """What a manifest records about the teacher."""

    name_or_path: str
    """As given: a local directory or a Hugging Face model id."""
    revision: str | None
    """Hub revision asked for (None: the default branch, or a local directory)."""
    weights_sha256: str | None
    """"sha256:..." over the weight files, or None for a hub model that is not in the local cache."""
    model_type: str
    """config.model_type, e.g. "llama"."""
    num_parameters: int
    dtype: str
    """The dtype the teacher runs in, e.g. "bfloat16"."""
    quantization: dict | None = None
    """The checkpoint's `quantization_config` (quant_method and its settings), None if none."""


def packed_position_ids(seq_lens: Sequence[Sequence[int]], length: int) -> Tensor:
    """(B, L) int64 position ids restarting at 0 per document; padding counts as one more."""
    rows = []
    for lens in _segments(seq_lens, length):
        rows.append(torch.cat([torch.arange(n) for n in lens]))
    return torch.stack(rows)


def _segments(seq_lens: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """Per row, the document lengths plus the padding tail (if any) as a last segment."""
    out = []
    for b, lens in enumerate(seq_lens):
        lens = [int(n) for n in lens]
        if any(n < 1 for n in lens) or sum(lens) > length:
            raise ValueError(
                f"row {b}: seq_lens {lens} must be positive and sum to at most L={length}"
            )
        tail = length - sum(lens)
        out.append([*lens, tail] if tail else lens)
    return out


class Teacher:
    """A loaded causal LM in eval mode, with packed-row hidden states and its output head."""

    def __init__(self, model: nn.Module, info: TeacherInfo) -> None:
        self.model = model
        self.info = info
        embed = model.get_input_embeddings().weight
        # Where input ids go: the embedding's device (with a device map, accelerate's hooks
        # move them on; an embedding offloaded to disk sits on "meta" and takes them on the CPU).
        self.device = embed.device if embed.device.type != "meta" else torch.device("cpu")
        self.dtype = next(model.parameters()).dtype
        self.slices: VocabSlices | None = None
        """This rank's share of a vocabulary split over tensor-parallel ranks (None: all of it)."""
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None or head.weight.ndim != 2:
            raise TeacherError(
                f"teacher {info.name_or_path}: {type(model).__name__} has no output head with a "
                f"(V, d) weight (get_output_embeddings() gave {type(head).__name__}). "
                f"Fix: use a causal LM checkpoint (one AutoModelForCausalLM loads with a lm_head)."
            )
        self._head = head
        self.offload: tempfile.TemporaryDirectory | None = None
        """The folder a device map offloads layers to, removed with the teacher."""
        self.vocab_size: int = head.weight.shape[0]
        self.plain_head: bool = type(head) is nn.Linear
        """True when the logits are `hidden @ W.T + b` (then transformed): chunked top-k applies."""
        self.logit_transform: Callable[[Tensor], Tensor] | None = _logit_transform(model.config)
        """Elementwise map from lm_head outputs (fp32) to the model's logits, if any."""
        attn = str(getattr(model.config, "_attn_implementation", None) or "")
        self._varlen = "flash" in attn  # flash kernels: flatten rows, pass cu_seq_lens

    @property
    def signals_device(self) -> torch.device:
        """Where `signals` computes (and where its generator must live): the lm_head's device."""
        weight = self.lm_head()[0]
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias or None) of the output head: (V, d) and (V,), or this rank's rows of
        them when the head is split by vocabulary (`slices`)."""
        weight, bias = self._head.weight, getattr(self._head, "bias", None)
        if self.slices is not None:
            weight = weight.to_local()
            bias = None if bias is None else bias.to_local()
        return weight, bias

    def split_vocabulary(self) -> None:
        """Walk only this rank's vocabulary slice: the lm_head is a DTensor sharded by rows."""
        weight = self._head.weight
        placements = getattr(weight, "placements", None)
        name = self.info.name_or_path
        from torch.distributed.tensor import Shard

        by_rows = placements is not None and placements == (Shard(0),)
        if not self.plain_head or not by_rows:
            raise TeacherError(
                f"teacher {name}: under --tp, kdcache needs the lm_head to be a linear layer "
                f"split by vocabulary, and transformers' plan for model_type "
                f"{self.info.model_type!r} gives {type(self._head).__name__} with placements "
                f"{placements}. Fix: build with --device-map auto (one process over the GPUs)."
            )
        self.slices = VocabSlices.gather(weight.to_local().shape[0])
        self.plain_head = True

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        seq_lens: Sequence[Sequence[int]] | None = None,
    ) -> Tensor:
        """(B, L, d) final (post-norm) hidden states of packed rows, in the model's dtype.

        `input_ids` (B, L); `seq_lens[b]` lists row b's document lengths (summing to <= L; the
        rest is padding, whose outputs are meaningless); None means one document per row.
        `position_ids`, if given, must equal `packed_position_ids(seq_lens, L)`.
        """
        bsz, length = input_ids.shape
        if seq_lens is None:
            seq_lens = [[length]] * bsz
        if len(seq_lens) != bsz:
            raise ValueError(f"seq_lens has {len(seq_lens)} rows, input_ids has {bsz}")
        pos = packed_position_ids(seq_lens, length)
        if position_ids is not None and not torch.equal(position_ids.cpu(), pos):
            raise ValueError("position_ids must restart at 0 for each document of seq_lens")
        ids, pos = input_ids.to(self.device), pos.to(self.device)
        body = self.model.base_model
        if not self._varlen:
            # attention_mask=None + restarting position ids: transformers masks per document.
            return body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        lens = torch.tensor([n for row in _segments(seq_lens, length) for n in row])
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(self.device, torch.int32)
        out = body(
            input_ids=ids.reshape(1, bsz * length),
            position_ids=pos.reshape(1, bsz * length),
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=int(lens.max()),
            max_length_k=int(lens.max()),
        )
        return out.last_hidden_state.reshape(bsz, length, -1)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """(..., V) float32 logits from hidden states (..., d) through the model's own head."""
        z = self._head(hidden).float()
        return z if self.logit_transform is None else self.logit_transform(z)

    @torch.inference_mode()
    def signals(
        self,
        hidden: Tensor,
        labels: Tensor,
        options: SignalOptions,
        *,
        generator: torch.Generator | None = None,
    ) -> TeacherSignals:
        """Teacher signals at N positions from hidden states (N, d); labels (N,), -1 for none."""
        if self.slices is not None:
            weight, bias = self.lm_head()
            return vocab_parallel_signals(
                hidden,
                weight,
                bias,
                labels,
                options,
                self.slices,
                generator=generator,
                logit_transform=self.logit_transform,
            )
        weight, bias = self.lm_head()
        if self.plain_head and weight.device.type != "meta":
            # With a device map the head may sit on another GPU than the last layer.
            hidden, labels = hidden.to(weight.device), labels.to(weight.device)
            return teacher_signals(
                hidden,
                weight,
                bias,
                labels,
                options,
                generator=generator,
                logit_transform=self.logit_transform,
            )
        step = options.row_chunk
        parts = []
        for r0 in range(0, hidden.shape[0], step):
            z = self.logits(hidden[r0 : r0 + step])
            lab = labels[r0 : r0 + step].to(z.device)
            parts.append(teacher_signals_from_logits(z, lab, options, generator=generator))
        return TeacherSignals.cat(parts)

    def check(self) -> None:
        """Prove packing and the head on this model with a tiny forward; raise TeacherError if not.

        Two rows pack [doc A, doc B] and [doc A', doc B]: doc B's hidden states must be the same
        in both (nothing leaks across documents) and match doc B run alone (positions restart),
        and `logits(hidden)` must reproduce the model's own forward.
        """
        name, gen = self.info.name_or_path, torch.Generator().manual_seed(0)
        high = min(self.vocab_size, self.model.get_input_embeddings().num_embeddings)
        a, a2, b = (torch.randint(high, (n,), generator=gen) for n in (3, 3, 5))
        rows = torch.stack([torch.cat([a, b]), torch.cat([a2, b])])
        packed = self.hidden_states(rows, seq_lens=[[3, 5], [3, 5]]).float()
        alone = self.hidden_states(b.unsqueeze(0)).float()
        tol = 1e-4 if self.dtype == torch.float32 else 3e-2
        if _rel_err(packed[0, 3:], packed[1, 3:]) > tol:
            raise TeacherError(
                f"teacher {name}: attention crosses documents packed in one row with "
                f"attn_implementation={self.model.config._attn_implementation!r} "
                f"({type(self.model).__name__}). Fix: load it with attn_implementation='sdpa' "
                f"or 'flash_attention_2', or build with one document per row (no packing)."
            )
        if _rel_err(packed[0, 3:], alone[0]) > tol:
            raise TeacherError(
                f"teacher {name}: a document packed after another does not match it run alone "
                f"({type(self.model).__name__} ignores restarting position_ids). Fix: build "
                f"with one document per row (no packing)."
            )
        with torch.inference_mode():
            own = self.model(input_ids=b.unsqueeze(0).to(self.device), use_cache=False)
        own_logits = own.logits.float()
        if _rel_err(self.logits(self.hidden_states(b.unsqueeze(0))), own_logits) > tol:
            raise TeacherError(
                f"teacher {name}: its logits are not lm_head(final hidden states) with a known "
                f"transform (softcapping, logit scale), so kdcache cannot compute them for "
                f"model_type {self.info.model_type!r}. Fix: use a supported architecture."
            )


def _logit_transform(config: object) -> Callable[[Tensor], Tensor] | None:
    """The elementwise map modelling code applies after the lm_head, read from the config."""
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if callable(get_text) else config
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(z / cap)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: z * scale
    divide = getattr(cfg, "logits_scaling", None)  # Granite: z / scaling
    factor = 1.0
    if isinstance(scale, (int, float)) and scale != 1:
        factor *= float(scale)
    if isinstance(divide, (int, float)) and divide != 1:
        factor /= float(divide)
    cap = float(softcap) if isinstance(softcap, (int, float)) and softcap > 0 else None
    if cap is None and factor == 1.0:
        return None

    def transform(z: Tensor) -> Tensor:
        if factor != 1.0:
            z = z.mul_(factor)
        if cap is not None:
            z = z.div_(cap).tanh_().mul_(cap)
        return z

    return transform


def _rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| relative to max |b| (a single number for a pass/fail check)."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
