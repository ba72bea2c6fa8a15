"""The moment adapter: low-rank deltas on the LLM's linear layers, switched on only while localisation windows and
moment queries are embedded.

A clip embedding should stay the same whichever part of the clip it is shown, a window embedding must change with
what happens in the window. With shared weights the tiny stage 3 learned moments only by spending retrieval
(docs/design.md, "Moment adapter"); the adapter gives the moment passes weights of their own. Each target linear
layer y = W x + b gains, while the adapter is active, (alpha / r) * B A x with A (r, in) and B (out, r); B starts at
zero, so a fresh adapter changes nothing. With `isolate` the moment passes also leave every other weight alone
(`ViLLE._moment_scope`): the decoder and the embedding head run on detached copies of their parameters, and the
decoder's inputs are detached, so the localisation loss trains the adapter only.

The deltas are added by forward hooks on the layers, found before peft wraps them (peft keeps the layer as its
`base_layer`) and registered only for the duration of a moment pass, so the LLM's own state dict, a peft LoRA and
every other pass are unchanged by it.
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
        self.isolating = False  # set by ViLLE._moment_scope
        # The target layers (a plain dict: not registered as sub-modules, so the LLM's weights are not saved twice).
        self.layers: dict[str, nn.Linear] = {}
        self._handles: list = []
        targets = set(cfg.target_modules)
        for name, module in llm.named_modules():
            if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets):
                continue
            key = name.replace(".", "__")
            down = torch.empty(cfg.r, module.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's own initialisation
            self.down[key] = nn.Parameter(down)
            self.up[key] = nn.Parameter(torch.zeros(module.out_features, cfg.r))
            self.layers[key] = module
        if not self.down:
            raise ValueError(f"model.moment_adapter.target_modules: {list(cfg.target_modules)} name no linear layer "
                             "of the LLM")

    def activate(self) -> None:
        """Hook the deltas onto the layers. Only while a moment pass runs: a hook that is registered but does
        nothing still sends every call of its layer through nn.Module's slower hooked path (+9-12 % per embedding
        call of the tiny model)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(_Delta(self, k)) for k, m in self.layers.items()]

    def deactivate(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Delta:
    """The forward hook of one layer while the adapter is active."""

    def __init__(self, adapter: MomentAdapter, key: str):
        self.adapter, self.key = adapter, key

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        down, up = a.down[self.key], a.up[self.key]
        delta = (args[0].to(down.dtype) @ down.t()) @ up.t()
        return out + (a.scale * delta).to(out.dtype)
