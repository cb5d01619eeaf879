"""Distil a fresh student from a kdcache cache in a plain PyTorch loop: no `kdcache train`.

    python examples/plain_loop.py CACHE [--steps 20] [--batch-tokens 2048]

The student is a small random Llama with the cache's vocabulary and the teacher's tokenizer
(the copy in the cache). The loop is the usual one; the cache gives the data, the collator
the tensors, and `kd_loss` the loss from the student's hidden states and lm_head.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from schemas import open_cache
from student_trainer import KDCollator, cache_dataset, check_student, kd_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()

    cache = open_cache(args.cache, require_complete=True)
    with cache.tokenizer_files() as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    check_student(cache, tokenizer)  # the student must see the ids the teacher saw
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cache.layout.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # --- the lines that distil from the cache ---
    data = cache_dataset(args.cache, seed=0, batch_tokens=args.batch_tokens)
    loader = DataLoader(data, batch_size=None, collate_fn=KDCollator(cache))
    step = 0
    while step < args.steps:
        for batch in loader:
            out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss, _terms = kd_loss(
                out.last_hidden_state,
                model.lm_head.weight,
                batch["kd_teacher"],
                rows=batch["kd_rows"],
                loss="fkl-tail",
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step == args.steps:
                break
        data.epoch += 1


if __name__ == "__main__":
    main()
