"""Data parallelism for the student: DDP when it fits one device, FSDP when it does not.

`wrap` returns the module whose forward the step calls. The rest of the trainer only meets
parallelism through three calls that work the same way in every mode: `clip_grad_norm`,
`full_state` / `load_full_state` (checkpoints hold ordinary full tensors, so a checkpoint
written by FSDP ranks resumes in one process and the other way round) and `student_weights`.

FSDP is FSDP2 (`fully_shard`, not the older `FullyShardedDataParallel` wrapper): each decoder
layer is its own unit, so only the layer running (and the one prefetched) is whole at a time,
and the root unit (embeddings, final norm, lm_head, an aux head) covers the rest. FSDP2 runs on
CPU with gloo, which is how the tests run it; on GPUs it uses NCCL the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from student_trainer.student import HiddenAndHead

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Unsharded tensors, on CPU, filled on rank 0 only (the only rank that writes files)."""
_SCATTER = StateDictOptions(full_state_dict=True)
"""Every rank passes the full tensors and keeps its own shard of each."""


def wrap(net: HiddenAndHead, device: torch.device, world: int, fsdp: bool) -> nn.Module:
    """Place `net` on `device` and return the module to call: `net` itself in one process,
    a DDP wrapper around it, or `net` sharded in place by FSDP (`fully_shard` swaps its
    class, so `net` and the returned module are the same object)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # FSDP and NCCL use the current device, not net's
    if world == 1:
        return net.to(device)
    if not fsdp:
        return nn.parallel.DistributedDataParallel(net.to(device))
    shard(net, device, world)
    return net


def shard(net: HiddenAndHead, device: torch.device, world: int) -> None:
    """Apply FSDP2 to each decoder layer of the student, then to `net` (the root).

    `net` stays where it was built (CPU): `fully_shard` moves each unit to the mesh's device as
    it shards it, so the whole student is never on one GPU. Decoder layers are the classes the
    model names in `_no_split_modules` (what Hugging Face Accelerate wraps too). A model that
    names none becomes one unit: parameters, gradients and optimizer state are still sharded,
    but each forward gathers the whole model (`fsdp_units` then reports 1).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    names = set(getattr(net.model, "_no_split_modules", None) or ())
    layers = [m for m in net.model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The root keeps its parameters whole from forward to backward (FSDP2's default for the
    # root): the loss inside forward and its backward use the same gathered lm_head.
    fully_shard(net, mesh=mesh)


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def fsdp_units(net: nn.Module) -> int:
    """How many FSDP units `net` holds (0: not sharded): its decoder layers plus the root."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(module, FSDPModule) for module in net.modules())


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients to a total norm of `max_norm` (inf: only measure); return the norm
    before clipping. Under FSDP each rank holds a shard of every gradient, so the norm is the
    DTensor norm reduced over ranks: every rank gets the same global value and the same clip."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # replicated: the norm over every rank's shards
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm if max_norm else math.inf, norm)
    return norm


def full_state(
    net: HiddenAndHead, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's full (unsharded) state on CPU, keyed by parameter name.

    Under FSDP this is a collective: every rank must call it, and only rank 0's dicts are filled.
    """
    return (
        get_model_state_dict(net, options=_GATHER),
        get_optimizer_state_dict(net, optimizer, options=_GATHER),
    )


def load_full_state(
    net: HiddenAndHead,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load what `full_state` returned; under FSDP each rank keeps its own shard of it."""
    set_model_state_dict(net, model_state, options=_SCATTER)
    set_optimizer_state_dict(net, optimizer, optimizer_state, options=_SCATTER)


def student_weights(net: HiddenAndHead) -> dict[str, Tensor] | None:
    """The student's full weights for `save_pretrained(state_dict=...)` when `net` is sharded
    (a collective: every rank must call it; filled on rank 0); None when its own parameters are
    whole, so `save_pretrained` reads them as usual."""
    if not is_sharded(net):
        return None
    prefix = "model."  # HiddenAndHead.model; the aux head is not part of the student
    weights = {
        name[len(prefix) :]: value
        for name, value in get_model_state_dict(net, options=_GATHER).items()
        if name.startswith(prefix)
    }
    # Tied parameters (an lm_head sharing the embedding) come back as separate copies. Make them
    # one tensor again: save_pretrained finds ties by shared storage and writes each tie once,
    # as it does for an unsharded model.
    first: dict[int, str] = {}
    for name, param in net.model.named_parameters(remove_duplicate=False):
        tied_to = first.setdefault(id(param), name)
        if tied_to != name and tied_to in weights and name in weights:
            weights[name] = weights[tied_to]
    return weights
