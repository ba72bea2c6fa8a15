"""Process groups and model wrapping. One code path: no WORLD_SIZE -> one process; torchrun -> a process group,
nccl on CUDA, gloo on CPU. DDP by default; FSDP2 (`fully_shard` on each vision block and LLM layer, then the rest)
as an option."""
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
        # Collect the training objects first (FSDP2's state sits in reference cycles): gloo work objects freed later,
        # while the interpreter shuts down, can abort the process ("terminate called without an active exception";
        # seen once in four 2-rank FSDP test runs before this).
        import gc

        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, parallel: str, bf16: bool = False) -> nn.Module:
    """-> the module to call in the loop (the unwrapped model stays reachable as `unwrap(m)`). FSDP2 shards in place:
    the returned module is `model` itself, its parameters replaced by DTensor shards, so build the optimizer after
    this. With `bf16` (the run's `train.amp`), FSDP2 gathers parameters in bf16 and reduces gradients in fp32; the
    sharded fp32 parameters stay the master copy."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"train.parallel: expected 'ddp' or 'fsdp', got {parallel!r}")
    if info.world_size == 1:
        return model
    if parallel == "ddp":
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for block in getattr(model.vision.trunk, "blocks", []):
        fully_shard(block, mp_policy=mp)
    for layer in model.base_llm().get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # the rest (embeddings, projector, heads, logit_scale) as one group
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor as is)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def gradient_sync(wrapped: nn.Module, sync: bool):
    """Context for one micro-batch's backward: without `sync`, gradients stay local (accumulated, reduced later)."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def unsynced():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return unsynced()
    return contextlib.nullcontext()


def forward_with_backward(model: nn.Module, fn):
    """fn() -> the result of a training step that runs backward passes of its own (gradient caching,
    ville/gradcache.py: the loss backward on the embeddings, then one per re-embedded chunk), for `model`'s wrapper
    as one forward. Without FSDP2 it is a plain call (under DDP the caller calls the model past its wrapper and
    reduces by hand: `reduce_cached_grads`).

    Under FSDP2 it runs between the root module's pre- and post-forward hooks (`register_fsdp_forward_method`), as
    `model(...)` would: the root group (embeddings, projector, heads, logit_scale) is gathered for the whole step.
    Each inner backward ends with FSDP2's post-backward callback, which reduce-scatters every group's gradients so
    far into the sharded `.grad` (they accumulate over chunks) and would also reshard the root group in the middle
    of its forward; its reshard after backward is off until fn returns (the root's post-forward then reshards it,
    and the step's last backward gathers it again)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(model, FSDPModule):
        return fn()
    model.set_reshard_after_backward(False, recurse=False)
    model._cached_step = fn  # an instance attribute, made a forward method of the root for this call only
    register_fsdp_forward_method(model, "_cached_step")
    try:
        return model._cached_step()
    finally:
        del model._cached_step
        model.set_reshard_after_backward(True, recurse=False)


def reduce_cached_grads(model: nn.Module) -> None:
    """After the backward passes of a step with gradient caching: DDP's mean over ranks by hand (the loss ran past
    the DDP wrapper); under FSDP2 the gradients are reduce-scattered already, and the root group is resharded so
    the optimizer updates the parameters the next forward gathers."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()
    else:
        all_reduce_grads(model)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over every rank's shards under FSDP2), then clipping to `max_norm`."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):  # a partial sum of shards: the full value needs the reduction
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def all_reduce_grads(model: nn.Module) -> None:
    """Mean of every parameter's gradient over ranks, as DDP computes it; a parameter no rank used keeps no
    gradient (AdamW then skips it, as under DDP), one that only some ranks used counts zero on the others."""
    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    used = all_reduce_max(torch.tensor([float(p.grad is not None) for p in params], device=params[0].device))
    for p, u in zip(params, used.tolist()):
        if u:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks: a flag raised on any rank is raised on all."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
