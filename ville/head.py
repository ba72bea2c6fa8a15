"""Embedding head (KV-Former) and matching head.

KV-Former: the queries are the (projected) hidden states of the generated embedding tokens; the keys and values are
P learned pooling vectors. Each query attends to the pooling vectors only (never to the other queries), then a
residual MLP, a masked mean over each sample's valid tokens, a projection to D and L2 normalisation. Unlike a
Q-Former the number of outputs follows the number of generated tokens.

Because queries are processed independently and the mean and the output projection are linear, the embedding of the
first t tokens for every t is a cumulative mean of the per-token outputs (`per_step`), which halting supervision and
the fixed-length variants use without re-running anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadCfg  # noqa: F401  (this stage's config; torch-free home in config.py)


class KVFormerHead(nn.Module):
    def __init__(self, cfg: HeadCfg, in_dim: int):
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"model.head: width {cfg.width} must be divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.q_in = nn.Linear(in_dim, cfg.width)
        self.pool = nn.Parameter(torch.randn(cfg.num_pool_tokens, cfg.width) * 0.02)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(cfg.width)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width))
        self.norm2 = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.dim)

    def token_outputs(self, states: torch.Tensor) -> torch.Tensor:
        """(B, K, H) hidden states -> (B, K, D) per-token outputs before the mean (not normalised)."""
        q = self.q_in(states.to(self.q_in.weight.dtype))
        kv = self.pool.unsqueeze(0).expand(q.shape[0], -1, -1)
        x = self.norm1(q + self.attn(q, kv, kv, need_weights=False)[0])
        x = self.norm2(x + self.mlp(x))
        return self.out(x)

    def forward(self, states: torch.Tensor, num_tokens: torch.Tensor | None) -> torch.Tensor:
        """states (B, K, H), num_tokens (B,) valid tokens per sample (>= 1) -> (B, D) L2-normalised.
        Positions >= num_tokens[b] are padding and never influence the result. num_tokens None: `per_step`."""
        if num_tokens is None:
            return self.per_step(states)
        tok = self.token_outputs(states)
        valid = torch.arange(tok.shape[1], device=tok.device)[None, :] < num_tokens.to(tok.device)[:, None]
        tok = tok.masked_fill(~valid[..., None], 0.0)  # also clears NaN/garbage in padded rows
        mean = tok.sum(1) / num_tokens.to(tok.device, tok.dtype).clamp_min(1)[:, None]
        return F.normalize(mean, dim=-1)

    def per_step(self, states: torch.Tensor) -> torch.Tensor:
        """(B, K, H) -> (B, K, D): row t is the normalised embedding pooled from tokens 1..t+1."""
        tok = self.token_outputs(states)
        steps = torch.arange(1, tok.shape[1] + 1, device=tok.device, dtype=tok.dtype)
        return F.normalize(tok.cumsum(1) / steps[None, :, None], dim=-1)


class MatchHead(nn.Module):
    """Hidden state of the `<match>` readout -> one logit per (video, text) pair."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.to(self.net[1].weight.dtype)).squeeze(-1)
