"""Loading a teacher: from a local directory or a Hugging Face id; whole on one device, split
over tensor-parallel ranks (`tp`), or placed over a node's devices by accelerate (`device_map`).

A loaded teacher says what the manifest records about it (`TeacherInfo`: the weights' hash, its
quantization) and has proved, with `Teacher.check`, that kdcache computes its logits right.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from cache_builder.teacher import Teacher, TeacherError, TeacherInfo

__all__ = ["load_teacher"]

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_HASH_BLOCK = 1 << 24  # 16 MiB reads keep hashing a 100 GB teacher at disk speed


def load_teacher(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    tp: int = 1,
    device_map: str | None = None,
    max_memory: dict[int | str, str] | None = None,
    hash_weights: bool = True,
) -> Teacher:
    """Load a causal LM teacher from a local directory or a Hugging Face id, ready for `build`.

    dtype "auto": bfloat16 on CUDA, float32 on CPU. device "auto": the current CUDA device if
    there is one, else the CPU. Raises `TeacherError` with the fix when the path is not a model
    or the model needs `trust_remote_code`. Runs `Teacher.check()` before returning.

    `tp` > 1 (every rank of a tensor-parallel group calls this, the default process group being
    the group): transformers' own tensor parallelism splits the layers, and the lm_head by
    vocabulary, over the group. `device_map` ("auto", with `max_memory` per device): one process,
    layers placed over the GPUs (then CPU, then a temporary offload folder) by accelerate.
    `hash_weights` False leaves `info.weights_sha256` None: the tensor-parallel ranks that do
    not write need no manifest, and need not read a 140 GB checkpoint once more each.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = os.fspath(name_or_path)
    local = _local_model_dir(name)
    source = str(local) if local is not None else name
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    if tp > 1 or device_map is not None:
        _require_accelerate("--tp" if tp > 1 else "--device-map")
    try:
        config = AutoConfig.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        _raise_if_remote_code(name, e)
        raise TeacherError(
            f"teacher {name}: transformers cannot read its config.json: {str(e).splitlines()[0]}"
        ) from e
    except OSError as e:
        raise TeacherError(
            f"teacher {name!r} is neither a local model directory nor a Hugging Face model found "
            f"on the hub or in the local cache ({e}). Fix: check the name and revision; offline "
            f"(HF_HUB_OFFLINE=1), download it first with `hf download {name}`."
        ) from e
    kwargs: dict = {}
    offload = None
    if tp > 1:
        _check_tp_shapes(name, config, tp)
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_size=tp)
    elif device_map is not None:
        offload = tempfile.TemporaryDirectory(prefix="kdcache-offload-")
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload.name)
    elif dev.type != "cpu" and _accelerate_available():
        kwargs["device_map"] = {"": dev}  # load straight onto the device
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except OSError as e:
        raise TeacherError(
            f"teacher {name}: no weights could be loaded ({e}). Fix: the directory needs "
            f"model.safetensors (or sharded *.safetensors with an index), as save_pretrained writes."
        ) from e
    except ValueError as e:
        _raise_if_remote_code(name, e)
        if "tp_plan" in str(e):
            raise TeacherError(
                f"teacher {name}: transformers has no tensor-parallel plan for model_type "
                f"{config.model_type!r} ({type(config).__name__} has no base_model_tp_plan), so "
                f"--tp cannot split it. Fix: build with --device-map auto (one process, layers "
                f"over the GPUs), or with --tp 1 if it fits one device."
            ) from e
        if "attention implementation" in str(e):
            raise TeacherError(
                f"teacher {name}: attn_implementation={attn_implementation!r} is not supported "
                f"by this model ({str(e).splitlines()[0]}). Fix: leave attn_implementation unset "
                f"or pass 'eager'."
            ) from e
        raise TeacherError(
            f"teacher {name}: not a causal language model that transformers can load "
            f"({str(e).splitlines()[0]}). Fix: use a decoder-only (AutoModelForCausalLM) checkpoint."
        ) from e
    if tp == 1 and device_map is None:
        model = model.to(dev)
    model = model.eval().requires_grad_(False)
    info = TeacherInfo(
        name_or_path=name,
        revision=revision,
        weights_sha256=_weights_sha256(
            local if local is not None else _cached_snapshot(name, revision)
        )
        if hash_weights
        else None,
        model_type=str(model.config.model_type),
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(torch_dtype).removeprefix("torch."),
        quantization=_quantization(model.config),
    )
    teacher = Teacher(model, info)
    teacher.offload = offload  # removed with the teacher
    if tp > 1:
        teacher.split_vocabulary()
    teacher.check()
    return teacher


def _accelerate_available() -> bool:
    from transformers.utils import is_accelerate_available

    return is_accelerate_available()


def _require_accelerate(option: str) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise TeacherError(
            f"{option} loads the teacher through accelerate, which cannot be imported ({e}). "
            f"Fix: pip install 'accelerate>=1.0' (kdcache depends on it: reinstall kdcache)."
        ) from e


def _check_tp_shapes(name: str, config: object, tp: int) -> None:
    """Refuse a split transformers' plan cannot make: attention heads shard by head."""
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if callable(get_text) else config
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if isinstance(count, int) and count % tp:
            raise TeacherError(
                f"teacher {name}: its {count} {what} do not split over --tp {tp}: tensor "
                f"parallelism gives each rank whole heads. Fix: a --tp that divides {count}, "
                f"or --device-map auto."
            )


def _quantization(config: object) -> dict | None:
    """The checkpoint's quantization settings as plain JSON, for the manifest."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    return json.loads(json.dumps(data, default=str, sort_keys=True))


def _raise_if_remote_code(name: str, error: ValueError) -> None:
    if "trust_remote_code" in str(error):
        raise TeacherError(
            f"teacher {name} ships its own modelling code (an auto_map in config.json), which "
            f"runs only with trust_remote_code=True. Fix: read that code, then pass "
            f"trust_remote_code=True (kdcache build --trust-remote-code)."
        ) from error


def _local_model_dir(name: str) -> Path | None:
    """The model directory `name` names, None for a hub id; TeacherError for a bad path."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherError(
                f"teacher path {path} is a file, not a model directory. Fix: pass the directory "
                f"holding config.json and the weights (as save_pretrained writes it), or a model id."
            )
        if not (path / "config.json").is_file():
            raise TeacherError(
                f"teacher directory {path} has no config.json, so it is not a Hugging Face model. "
                f"Fix: point at a directory written by save_pretrained (config.json + "
                f"*.safetensors), or pass a model id such as 'Qwen/Qwen2.5-0.5B'."
            )
        return path
    looks_like_path = (
        name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name == ""
    )
    if looks_like_path:
        raise TeacherError(
            f"teacher path {path} does not exist (relative paths start from {Path.cwd()}). "
            f"Fix: check the path, or pass a Hugging Face model id like 'org/name'."
        )
    return None


def _cached_snapshot(name: str, revision: str | None) -> Path | None:
    """The local HF-cache snapshot directory of a hub model, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _weights_sha256(directory: Path | None) -> str | None:
    """sha256 over (file name, sha256 of content) of the weight files, sorted by name.

    The safetensors files if there are any (what transformers loads), else the *.bin files.
    """
    if directory is None:
        return None
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        return None
    total = hashlib.sha256()
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        total.update(f"{file.name}\0{digest.hexdigest()}\n".encode())
    return "sha256:" + total.hexdigest()


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise TeacherError(
            f"unknown teacher dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}"
        )
    return _DTYPES[dtype]
