"""Process groups and model wrapping. One code path: no WORLD_SIZE -> one process; torchrun -> a process group,
nccl on CUDA, gloo on CPU. DDP by default; FSDP2 (`fully_shard` on each vision block and LLM layer) as an option."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """-> the module to call in the loop (the unwrapped model stays reachable as `unwrap(m)`)."""
    if info.world_size == 1:
        return model
    if parallel == "ddp":
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model.vision.trunk, "blocks", []):
            fully_shard(block)
        for layer in model.base_llm().get_decoder().layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel: expected 'ddp' or 'fsdp', got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
