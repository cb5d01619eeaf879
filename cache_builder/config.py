"""`BuildConfig`: every setting of `kdcache build`, typed, documented and checked once.

Saved with the cache (`manifest.build.config`), so a cache says exactly how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.errors import ConfigError

FORMATS = ("zarr", "arrow")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    out: str
    """--out: where the cache goes, a local directory or an fsspec URL (s3://, memory://, ...)."""
    teacher: str | None = None
    """--teacher: a Hugging Face causal LM (local directory or hub id); None: the embedded default."""
    revision: str | None = None
    """--revision: the teacher's (and tokenizer's) git revision on the hub."""
    dtype: str = "auto"
    """--dtype: teacher weights/compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."""
    device: str = "auto"
    """--device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    tp: int = 1
    """--tp: tensor-parallel ranks per teacher (under torchrun; world = data-parallel groups x tp)."""
    device_map: str | None = None
    """--device-map: "auto" places the teacher's layers over this node's GPUs in one process."""
    max_memory: str | None = None
    """--max-memory: with --device-map, memory per device, e.g. "0=70GiB,1=70GiB,cpu=200GiB"."""
    attn_implementation: str | None = None
    """--attn-implementation: passed to from_pretrained (sdpa, eager, flash_attention_2, flex_attention)."""
    trust_remote_code: bool = False
    """--trust-remote-code: allow the teacher's own modelling code to run. Off unless asked."""
    dataset: str | None = None
    """--dataset: jsonl/json/parquet/csv/txt files or globs, a save_to_disk directory, or a hub id; None: the embedded default."""
    split: str = "train"
    """--split: which split of the dataset."""
    text_field: str = "text"
    """--text-field: the column holding the text (a pre-tokenized `input_ids` column is used as is)."""
    chat_template: bool = False
    """--chat-template: render a `messages` column with the tokenizer's chat template."""
    max_documents: int | None = None
    """--max-documents: use only the first N rows of the dataset (quick trials); None: all."""
    skip_bad_rows: bool = False
    """--skip-bad-rows: leave out rows that cannot be documents, and the unreadable rest of a
    corrupt or truncated file, counting them (summary, manifest); off: the first one stops the
    build naming its file and row. See `cache_builder.rows`."""
    max_length: int = 2048
    """--max-length: tokens per packed row; longer documents are split into windows."""
    top_k: int = 64
    """--top-k: how many of the teacher's most likely next tokens to keep per position (0 with
    --samples: a samples-only cache)."""
    samples: int = 0
    """--samples: tokens drawn per position from the teacher (for sampled-logit losses such as rskd)."""
    sample_temperature: float = 1.0
    """--sample-temperature: temperature of the distribution samples are drawn from."""
    temperatures: tuple[float, ...] = ()
    """--temperatures: also store log-sum-exp(logits / T) for these T (exact tails at T != 1)."""
    value_encoding: str | None = None
    """--value-encoding: how log-probabilities are stored; None: the default for the vocabulary."""
    id_encoding: str | None = None
    """--id-encoding: how top-k ids are stored; None: the default for the vocabulary."""
    format: str = "zarr"
    """--format: zarr (sharded arrays, good on object stores) or arrow (IPC files, read by pyarrow/DuckDB)."""
    shard_tokens: int = 1 << 20
    """--shard-tokens: tokens per shard (the unit of commit, resume and shuffling)."""
    batch_tokens: int = 16384
    """--batch-tokens: tokens per teacher forward."""
    vocab_chunk: int = 131072
    """--vocab-chunk: vocabulary columns per step of the top-k/log-sum-exp pass (memory vs speed)."""
    seed: int = 0
    """--seed: seeds the sampled tokens (per shard, so resumed builds draw the same ones)."""
    overwrite: bool = False
    """--overwrite: replace a cache at --out that was made with other settings."""
    break_lock: bool = False
    """--break-lock: take the lock on --out even from a build that looks alive (`schemas.lock`)."""
    progress: bool = True
    """--progress/--no-progress: show a progress bar with tokens/s and ETA."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for --out (credentials, endpoint); not part of the cache's identity."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_length >= 2, "--max-length must be at least 2"),
            (
                self.top_k >= 1 or (self.top_k == 0 and self.samples > 0),
                "--top-k must be at least 1, or 0 with --samples N (a samples-only cache, for rskd)",
            ),
            (
                self.max_documents is None or self.max_documents >= 1,
                "--max-documents must be at least 1",
            ),
            (self.samples >= 0, "--samples must be 0 or more"),
            (
                self.samples <= 65535,
                "--samples must be at most 65535 (counts are stored as uint16)",
            ),
            (self.sample_temperature > 0, "--sample-temperature must be > 0"),
            (all(t > 0 for t in self.temperatures), "--temperatures must all be > 0"),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}"),
            (self.shard_tokens >= self.max_length, "--shard-tokens must be at least --max-length"),
            (self.batch_tokens >= self.max_length, "--batch-tokens must be at least --max-length"),
            (self.vocab_chunk >= 1, "--vocab-chunk must be at least 1"),
            (
                self.dtype in ("auto", "bfloat16", "float16", "float32"),
                "--dtype must be auto, bfloat16, float16 or float32",
            ),
            (self.tp >= 1, "--tp must be at least 1"),
            (
                self.device_map in (None, "auto"),
                "--device-map takes 'auto' (accelerate places the layers over the GPUs)",
            ),
            (
                self.tp == 1 or self.device_map is None,
                "--tp and --device-map are two ways to split a teacher: pass one of them",
            ),
            (
                self.max_memory is None or self.device_map is not None,
                "--max-memory applies to --device-map auto: pass both",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)

    def identity(self) -> dict[str, Any]:
        """The settings saved in the manifest (storage credentials and UI switches left out)."""
        from dataclasses import asdict

        data = asdict(self)
        for key in ("storage_options", "progress", "overwrite", "break_lock"):
            data.pop(key)
        data["temperatures"] = list(self.temperatures)
        return data


def parse_max_memory(text: str) -> dict[int | str, str]:
    """ "0=70GiB,1=70GiB,cpu=200GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"} for accelerate."""
    out: dict[int | str, str] = {}
    for item in text.split(","):
        device, sep, size = (x.strip() for x in item.partition("="))
        ok_device = device.isdigit() or device in ("cpu", "disk")
        if not sep or not ok_device or not size[:1].isdigit():
            raise ConfigError(
                f"--max-memory {text!r}: {item.strip()!r} is not DEVICE=SIZE",
                hint="give GPU indices, cpu or disk with sizes, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
            )
        out[int(device) if device.isdigit() else device] = size
    return out
