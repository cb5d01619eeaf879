"""What a build records about itself: the manifest of the finished cache, minus its shards.

It is known before any shard is written (every shard carries its fingerprint), from the
settings, the teacher, its tokenizer and the data pass.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from cache_builder.config import BuildConfig
from cache_builder.rows import BadRows
from cache_builder.teacher import Teacher
from cache_builder.tokenizer import tokenizer_info
from schemas.cache import file_info
from schemas.encodings import TopkEncoding, default_encoding
from schemas.errors import ConfigError
from schemas.manifest import BuildSettings, DatasetInfo, Manifest, TeacherInfo, TokenizerInfo
from schemas.record import Layout
from schemas.storage import public_location


def draft_manifest(
    cfg: BuildConfig,
    teacher: Teacher,
    teacher_label: str,
    tokenizer,
    tokenizer_bytes: dict[str, bytes],
    data: dict,
    encoding: TopkEncoding,
    skipped: BadRows,
    parallel: dict | None = None,
) -> Manifest:
    """The manifest of the finished cache, minus its shards. Nothing local or secret goes in:
    where things were is recorded by `public_location`, what they were by their hashes. The
    build config also counts what --skip-bad-rows left out (outside the cache's fingerprint, like
    all of the config: the dataset fingerprint covers the token stream that is left). So does the
    parallel layout (`parallel`: tp, dp, world size, device map): how the teacher was split
    does not change what the cache holds. A quantized teacher is recorded in the
    `teacher_quantization` extension (its weights hash already tells it from the unquantized
    one, so a reader that does not know the field reads the cache right)."""
    tok = tokenizer_info(tokenizer)
    tok["name_or_path"] = teacher_label  # the tokenizer is always the teacher's own
    files = tuple(file_info(name, data) for name, data in sorted(tokenizer_bytes.items()))
    return Manifest(
        format=cfg.format,
        teacher=_teacher_info(teacher, teacher_label),
        tokenizer=TokenizerInfo(**tok, files=files),
        dataset=DatasetInfo(**data),
        build=BuildSettings(
            top_k=cfg.top_k,
            max_length=cfg.max_length,
            packing="block-diagonal",
            num_samples=cfg.samples,
            sample_temperature=cfg.sample_temperature,
            temperatures=tuple(cfg.temperatures),
            dtype=str(teacher.dtype).removeprefix("torch."),
            seed=cfg.seed,
            shard_tokens=cfg.shard_tokens,
            config={
                **_public_config(cfg),
                "skipped_rows": skipped.rows,
                "skipped_files": skipped.files,
                "parallel": parallel or {"tp": 1, "dp": 1, "world_size": 1, "device_map": None},
            },
        ),
        layout=Layout(
            k=cfg.top_k,
            vocab_size=teacher.vocab_size,
            temperatures=tuple(cfg.temperatures),
            num_samples=cfg.samples,
            content_keys=True,
            compact_samples=cfg.samples > 0,
        ),
        encoding=encoding.to_json(),
        extensions=_quantization_extension(teacher),
    )


def _quantization_extension(teacher: Teacher) -> dict:
    quantization = teacher.info.quantization
    if quantization is None:
        return {}
    return {"teacher_quantization": {"must_understand": False, **quantization}}


def _teacher_info(teacher: Teacher, label: str) -> TeacherInfo:
    info = dataclasses.asdict(teacher.info)
    info.pop("quantization")  # an extension (see draft_manifest)
    return TeacherInfo(**{**info, "name_or_path": label})


def encoding_for(cfg: BuildConfig, vocab_size: int) -> TopkEncoding:
    """How the cache stores top-k ids and log-probs: the vocabulary's default, with what
    --id-encoding and --value-encoding override; refused, naming them, when it cannot work."""
    if cfg.top_k > vocab_size:
        raise ConfigError(
            f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({vocab_size})"
        )
    base = default_encoding(vocab_size)
    try:
        enc = TopkEncoding.from_json(
            {
                **base.to_json(),
                **({"ids": cfg.id_encoding} if cfg.id_encoding else {}),
                **({"values": cfg.value_encoding} if cfg.value_encoding else {}),
            }
        )
        enc.columns(max(cfg.top_k, 1), vocab_size)
    except ValueError as exc:
        raise ConfigError(
            f"{exc}", hint="see `kdcache build --help` for --id-encoding and --value-encoding"
        ) from None
    return enc


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files `save_pretrained` writes for `tokenizer`: the copy stored in the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir())}


def _public_config(cfg: BuildConfig) -> dict:
    """The build settings as the manifest records them: no output location, sources by
    `public_location`."""
    config = cfg.identity()
    config.pop("out")
    for key in ("teacher", "dataset"):
        if config[key] is not None:
            config[key] = public_location(config[key])
    return config
