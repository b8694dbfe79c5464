"""Parallelism lives here, never in the model: torchrun process groups and FSDP2.

``torchrun --nproc-per-node N -m nestlm train RECIPE --out DIR`` runs one trainer
per process. Each block is wrapped with ``fully_shard`` (FSDP2), then the root.
Routers are small and replicated: broadcast from rank 0 at the start, their gradients
averaged by hand. Budgets are drawn from the same seeded generator on every rank, so all
ranks run the same sub-network at each step.

Every collective of the trainer goes through the functions below, and each checks its
tensor's device against the group's backend first: NCCL takes CUDA tensors only, and gloo
accepts CPU ones, so a CPU run would never catch a CPU tensor that a GPU run sends to
NCCL (where it fails or hangs). A backend string such as ``cpu:gloo,cuda:nccl`` maps
each device type to its backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "gloo"  # the default group's backend (dist.get_backend()), e.g. "nccl" or "cpu:gloo,cuda:nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


class CollectiveDeviceError(RuntimeError):
    """A tensor on a device that the process group's backend cannot move (a CPU tensor to NCCL)."""


def backend_for(backend: str, device: torch.device) -> str | None:
    """The backend that carries tensors of ``device`` in a group of ``backend`` (None: none does)."""
    if ":" not in backend and "," not in backend:  # one backend for every device type it supports
        if backend.lower() == "nccl":
            return backend if device.type == "cuda" else None
        return backend
    table = dict(part.split(":", 1) for part in backend.split(",") if ":" in part)
    return table.get(device.type)


def check_device(t: torch.Tensor, info: DistInfo, what: str) -> None:
    """Refuse, before any process blocks, a collective whose tensor the backend cannot take."""
    if backend_for(info.backend, t.device) is None:
        raise CollectiveDeviceError(
            f"{what}: a {t.device.type} tensor cannot go through the {info.backend!r} process group "
            "(NCCL needs CUDA tensors); create it on the training device"
        )


def shard_model(model: torch.nn.Module, mp_policy: object | None = None) -> torch.nn.Module:
    """FSDP2: shard every block, then the root (embeddings, final norm, head).

    ``mp_policy``: a ``MixedPrecisionPolicy`` (train/precision.py): fp32 sharded master weights,
    gathered in bf16 for compute, gradients reduced in fp32."""
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks (a new tensor; ``t`` itself is left alone)."""
    t = t.detach().clone()
    if not info.enabled:
        return t
    check_device(t, info, "all_reduce")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    return all_reduce_sum(t, info) / info.world


def average_gradients(module: torch.nn.Module, info: DistInfo) -> None:
    """Average the gradients of a replicated (unsharded) module across ranks."""
    if not info.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            check_device(p.grad, info, "average_gradients")
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= info.world


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's parameters and buffers on every rank (replicated modules: the routers, from step 0)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            check_device(t, info, "broadcast")
            dist.broadcast(t.data, src=0)


def full_state_dict(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU; under FSDP2 every rank must call this."""
    if not info.enabled:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
