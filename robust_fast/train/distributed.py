"""Data-parallel helpers: torchrun's environment, the process group, rank-0-only work.

Under `torchrun` (WORLD_SIZE > 1 in the environment) every rank runs the same recipe on its
shard of each global batch; DistributedDataParallel averages the gradients. Without torchrun
there is one rank and nothing here does anything.
"""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes checkpoints, logs and results, and draws progress bars."""
    return rank() == 0


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env() -> bool:
    """Joins the process group torchrun describes (gloo on CPU, nccl on GPU); True when this
    process is one of several. Nothing happens without torchrun's WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        device = default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(value: Any) -> List[Any]:
    """Every rank's value, in rank order (a list of one without a process group)."""
    if not is_distributed():
        return [value]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_across_ranks(values: List[float]) -> List[float]:
    if not is_distributed():
        return list(values)
    on = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return tensor.tolist()
