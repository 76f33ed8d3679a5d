"""Process-group plumbing: the same trainer on CPU, one GPU, or ``torchrun --nproc_per_node=N``.

``torchrun`` (or a test that spawns processes) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; without them the run is a single process. NCCL on CUDA,
gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but CUDA is not available (torch built without CUDA, or no GPU)")
        if spec == "cuda":
            spec = f"cuda:{local_rank}"
    return torch.device(spec)


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (env vars), else a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_spec, local_rank)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        ctx.initialized_here = True
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (in place on a copy placed on the process's device); identity alone."""
    if not ctx.distributed:
        return tensor
    t = tensor.to(ctx.device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def replica_max_difference(model: torch.nn.Module, ctx: DistContext) -> float:
    """Largest |parameter - rank 0's parameter| over all ranks (0.0 alone): DDP replicas must agree."""
    if not ctx.distributed:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).to(ctx.device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
