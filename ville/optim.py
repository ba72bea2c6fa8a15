"""Optimiser and schedule: AdamW with per-part learning rates (tower / LLM / LoRA and the moment adapter /
projector and heads / stop biases), warmup then cosine decay to `min_lr_ratio` of each group's peak rate."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimCfg  # noqa: F401  (this stage's config; torch-free home in config.py)


def part_of(name: str) -> str:
    """Which learning-rate group a parameter belongs to, from its (possibly DDP/peft-wrapped) name."""
    name = name.removeprefix("module.")
    if "lora_" in name or name.startswith("moment_adapter."):
        return "lora"
    if name.startswith("llm."):
        return "llm"
    if name.startswith("vision.trunk."):
        return "vision"
    if name in ("stop_step_bias", "stop_motion"):
        return "stop"
    return "base"  # projector, temporal position, heads, queries, logit scale


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name or name.endswith("_query") or "temporal_pos" in name or "pool" in name


def build_optimizer(model: nn.Module, cfg: OptimCfg) -> torch.optim.Optimizer:
    lrs = {"base": cfg.lr, "vision": cfg.lr_vision or cfg.lr, "llm": cfg.lr_llm or cfg.lr,
           "lora": cfg.lr_lora or cfg.lr, "stop": cfg.lr_stop or 100 * cfg.lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((part_of(name), _no_decay(name, p)), []).append(p)
    params = [{"params": ps, "lr": lrs[part], "weight_decay": 0.0 if nd else cfg.weight_decay, "name": f"{part}"}
              for (part, nd), ps in sorted(groups.items())]
    if not params:
        raise ValueError("no trainable parameters (check model.vision.freeze / model.llm.lora)")
    return torch.optim.AdamW(params, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimCfg, max_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
