"""Distil a student with Hugging Face `Trainer` from a kdcache cache: three lines change.

    python examples/hf_trainer.py CACHE OUT [--steps 20]
    torchrun --nproc_per_node 2 examples/hf_trainer.py CACHE OUT     # DDP (gloo on the CPU)

An ordinary Trainer script: the dataset, the collator and the Trainer class are kdcache's
(marked below), the rest is the Trainer's own (optimizer, schedule, clipping, checkpoints,
logging). The KD terms appear in the Trainer's logs beside its loss.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from schemas import open_cache
from student_trainer import KDCollator, cache_dataset, check_student
from student_trainer.hf import KDTrainer, kd_training_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()

    cache = open_cache(args.cache, require_complete=True)
    with cache.tokenizer_files() as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    check_student(cache, tokenizer)
    torch.manual_seed(0)
    student = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cache.layout.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    training = kd_training_arguments(
        output_dir=args.out,
        max_steps=args.steps,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = KDTrainer(  # kdcache: the Trainer class, with the loss by name
        model=student,
        args=training,
        kd_loss="fkl-tail",
        train_dataset=cache_dataset(args.cache, batch_tokens=args.batch_tokens),  # kdcache
        data_collator=KDCollator(cache),  # kdcache
    )
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    for entry in trainer.state.log_history:
        if "kd_loss" in entry:
            print(f"step {entry['step']} loss {entry['loss']:.4f} kd_loss {entry['kd_loss']:.4f}")


if __name__ == "__main__":
    main()
