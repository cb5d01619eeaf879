"""What `kdcache inspect` reports: the manifest in brief and how faithful the cache is.

A cache of format 2.0 or later carries the fidelity its build measured from the exact logits
(`schemas.fidelity`), so nothing but the manifest is read. For a 1.x cache the teacher
statistics are estimated from a sample of its stored tokens instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from schemas.cache import Cache


def _quantization(block: object) -> dict[str, Any] | None:
    """The `teacher_quantization` extension without its marker, or None for an unquantized teacher."""
    if not isinstance(block, dict):
        return None
    return {k: v for k, v in block.items() if k != "must_understand"}


def describe(cache: Cache, *, sample_tokens: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """A JSON-ready summary of `cache`: the manifest's facts and its fidelity block (or, for a
    1.x cache, teacher statistics from a sample of tokens)."""
    m = cache.manifest
    tokens = m.num_tokens
    fidelity = dataclasses.asdict(m.fidelity) if m.fidelity else None
    return {
        "url": cache.url,
        "status": m.status,
        "schema_version": m.schema_version,
        "created_by": m.created_by,
        "format": m.format,
        "teacher": {
            **dataclasses.asdict(m.teacher),
            "quantization": _quantization(m.extensions.get("teacher_quantization")),
        },
        "tokenizer": dataclasses.asdict(m.tokenizer),
        "dataset": dataclasses.asdict(m.dataset),
        "k": m.layout.k,
        "vocab_size": m.layout.vocab_size,
        "temperatures": list(m.layout.temperatures),
        "num_samples": m.layout.num_samples,
        "compact_samples": m.layout.compact_samples,
        "encoding": m.encoding,
        "shards": len(m.shards),
        "sequences": m.num_sequences,
        "tokens": tokens,
        "bytes": m.nbytes,
        "bytes_per_token": m.nbytes / tokens if tokens else None,
        "derived": dataclasses.asdict(m.derived) if m.derived else None,
        "fidelity": fidelity,
        "teacher_stats": (
            None if fidelity else teacher_stats(cache, sample_tokens=sample_tokens, seed=seed)
        ),
    }


def teacher_stats(cache: Cache, *, sample_tokens: int, seed: int) -> dict[str, float | int]:
    """Mean tail mass, entropy of the renormalised top-k, top-1 probability, label coverage.

    Reads whole shards picked at random until `sample_tokens` tokens are in hand.
    """
    rng = np.random.default_rng(seed)
    picked, total = [], 0
    for i in rng.permutation(len(cache.shards)):
        if total >= sample_tokens:
            break
        r = cache.read_shard(int(i))
        picked.append(r)
        total += r.num_tokens
    if not total:
        return {"sampled_tokens": 0}
    lp = np.concatenate([r.topk_logprobs for r in picked])[:sample_tokens].astype(np.float64)
    tail = np.concatenate([r.log_tail for r in picked])[:sample_tokens].astype(np.float64)
    ids = np.concatenate([r.topk_ids for r in picked])[:sample_tokens]
    label_lp = np.concatenate([r.label_logprob for r in picked])[:sample_tokens]
    inputs = np.concatenate([np.append(r.input_ids[1:], -1) for r in picked])[:sample_tokens]
    p = np.exp(lp)
    renorm = p / p.sum(axis=1, keepdims=True)
    entropy = -(renorm * np.log(np.maximum(renorm, 1e-300))).sum(axis=1)
    has_label = ~np.isnan(label_lp)
    in_topk = (ids == inputs[:, None]).any(axis=1)
    return {
        "sampled_tokens": int(lp.shape[0]),
        "mean_tail_mass": float(np.exp(tail).mean()),
        "mean_topk_entropy_nats": float(entropy.mean()),
        "mean_top1_prob": float(p[:, 0].mean()),
        "label_in_topk": float(in_topk[has_label].mean()) if has_label.any() else float("nan"),
        "mean_label_nll": float(-label_lp[has_label].mean()) if has_label.any() else float("nan"),
    }
