"""The moment adapter: low-rank deltas on the LLM's linear layers, switched on only while localisation windows and
moment queries are embedded.

A clip embedding should stay the same whichever part of the clip it is shown, a window embedding must change with
what happens in the window. With shared weights the tiny stage 3 learned moments only by spending retrieval
(docs/design.md, "Moment adapter"); the adapter gives the moment passes weights of their own. Each target linear
layer y = W x + b gains, while the adapter is active, (alpha / r) * B A x with A (r, in) and B (out, r); B starts at
zero, so a fresh adapter changes nothing. With `isolate` the moment passes also leave every other weight alone
(`ViLLE._moment_scope`): the decoder and the embedding head run on detached copies of their parameters, and the
decoder's inputs are detached, so the localisation loss trains the adapter only.

The deltas are added by forward hooks on the layers, registered before peft wraps them (peft keeps the layer as its
`base_layer`), so the LLM's own state dict and a peft LoRA are unchanged by it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import MomentAdapterCfg  # noqa: F401  (this stage's config; torch-free home in config.py)


class MomentAdapter(nn.Module):
    def __init__(self, llm: nn.Module, cfg: MomentAdapterCfg):
        super().__init__()
        if cfg.r < 1:
            raise ValueError(f"model.moment_adapter.r: expected >= 1 for an adapter, got {cfg.r}")
        self.cfg = cfg
        self.scale = cfg.alpha / cfg.r
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        self.active = False  # set by ViLLE._moment_scope
        self.isolating = False
        targets = set(cfg.target_modules)
        for name, module in llm.named_modules():
            if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets):
                continue
            key = name.replace(".", "__")
            down = torch.empty(cfg.r, module.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's own initialisation
            self.down[key] = nn.Parameter(down)
            self.up[key] = nn.Parameter(torch.zeros(module.out_features, cfg.r))
            module.register_forward_hook(_Delta(self, key))
        if not self.down:
            raise ValueError(f"model.moment_adapter.target_modules: {list(cfg.target_modules)} name no linear layer "
                             "of the LLM")


class _Delta:
    """The forward hook of one layer: an object, not a closure, so a deep copy of the model hooks the copy's adapter."""

    def __init__(self, adapter: MomentAdapter, key: str):
        self.adapter, self.key = adapter, key

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        a = self.adapter
        if not a.active:
            return None
        down, up = a.down[self.key], a.up[self.key]
        delta = (args[0].to(down.dtype) @ down.t()) @ up.t()
        return out + (a.scale * delta).to(out.dtype)
