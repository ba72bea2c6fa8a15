"""Vision tower: frames -> per-frame patch tokens (timm trunk) -> optional spatial pooling -> temporal position.

Input frames are either uint8 `(B, T, H, W, 3)` (what video decoders give) or float `(B, T, 3, H, W)` in [0, 1], of any
H x W (resized to the tower's input size) and any T in [1, max_frames]. Normalisation follows the tower's own timm data
config (SigLIP: mean = std = 0.5). Output: `(B, T * N, C)` tokens, N patch tokens per frame after pooling, C the
tower's width.

With `motion: true` each token also carries its change since the previous frame: `(B, T * N, 2C)`, channels
`[x_t + pos_t, x_t - x_{t-1}]` (zero change for the first frame). The trunk sees one frame at a time, so without it
the LLM has to compare frames itself to see what moved, appeared or changed colour; the difference puts that on every
token (ours: the synthetic benchmark's events are changes, and a from-scratch tiny model did not learn to find them
(README, design choices)).
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionCfg  # noqa: F401  (this stage's config; torch-free home in config.py)


def _create_trunk(cfg: VisionCfg) -> nn.Module:
    kwargs = dict(cfg.overrides)
    if cfg.checkpoint:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.checkpoint)
    try:
        trunk = timm.create_model(cfg.name, pretrained=cfg.pretrained or bool(cfg.checkpoint), **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"model.vision.name: unknown timm model {cfg.name!r} ({e})") from e
        raise
    # We pool ourselves (per-token outputs are the LLM's input), so drop timm's classifier and pooling head.
    trunk.reset_classifier(0, global_pool="")
    return trunk


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionCfg):
        super().__init__()
        if cfg.max_frames < 1 or cfg.pool < 1:
            raise ValueError(f"model.vision: max_frames and pool must be >= 1, got {cfg.max_frames}, {cfg.pool}")
        if cfg.pool_mode not in ("avg", "max"):
            raise ValueError(f"model.vision.pool_mode: expected 'avg' or 'max', got {cfg.pool_mode!r}")
        self.cfg = cfg
        self.trunk = _create_trunk(cfg)
        data_cfg = timm.data.resolve_model_data_config(self.trunk)
        img_size = getattr(getattr(self.trunk, "patch_embed", None), "img_size", None) or data_cfg["input_size"][1:]
        self.input_size = tuple(int(s) for s in img_size)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.width = int(self.trunk.num_features)
        self.out_width = 2 * self.width if cfg.motion else self.width  # channels per output token
        self.num_prefix = int(getattr(self.trunk, "num_prefix_tokens", 0))
        with torch.no_grad():
            probe = self._trunk_tokens(torch.zeros(1, 3, *self.input_size))
        self.grid = probe.shape[1:3]
        self.tokens_per_frame = math.ceil(self.grid[0] / cfg.pool) * math.ceil(self.grid[1] / cfg.pool)
        self.temporal_pos = nn.Parameter(torch.zeros(cfg.max_frames, self.width))
        nn.init.normal_(self.temporal_pos, std=0.02)
        if cfg.grad_checkpointing and hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(True)
        if cfg.freeze:
            for p in self.trunk.parameters():
                p.requires_grad_(False)

    def _trunk_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) normalised -> (n, gh, gw, C) patch grid."""
        feats = self.trunk.forward_features(images)
        if feats.ndim == 4:  # convolutional trunk: (n, C, gh, gw)
            return feats.permute(0, 2, 3, 1)
        tokens = feats[:, self.num_prefix :]
        side = math.isqrt(tokens.shape[1])
        grid = getattr(getattr(self.trunk, "patch_embed", None), "grid_size", None) or (side, side)
        return tokens.reshape(tokens.shape[0], int(grid[0]), int(grid[1]), tokens.shape[-1])

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """Validate and convert frames to normalised float `(B*T, 3, h, w)` at the tower's input size."""
        self.validate(frames)
        B, T = frames.shape[:2]
        if frames.dtype == torch.uint8:
            x = frames.permute(0, 1, 4, 2, 3).reshape(B * T, 3, *frames.shape[2:4]).float() / 255.0
        else:
            x = frames.reshape(B * T, *frames.shape[2:]).float()
        x = x.to(self.mean.device)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def validate(self, frames) -> int:
        """Raise ValueError naming what was expected and given; returns the batch size."""
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"frames: expected a torch.Tensor, got {type(frames).__name__}")
        if frames.ndim != 5:
            raise ValueError(
                "frames: expected uint8 (B, T, H, W, 3) or float (B, T, 3, H, W), "
                f"got a {frames.ndim}-d tensor of shape {tuple(frames.shape)}"
            )
        B, T = frames.shape[:2]
        if not 1 <= T <= self.cfg.max_frames:
            raise ValueError(f"frames: T={T} frames given, expected 1..{self.cfg.max_frames} (model.vision.max_frames)")
        if frames.dtype == torch.uint8:
            if frames.shape[-1] != 3:
                raise ValueError(f"frames: uint8 frames must be (B, T, H, W, 3), got shape {tuple(frames.shape)}")
        elif frames.is_floating_point():
            if frames.shape[2] != 3:
                raise ValueError(f"frames: float frames must be (B, T, 3, H, W) in [0, 1], got {tuple(frames.shape)}")
        else:
            raise ValueError(f"frames: dtype must be uint8 or floating point, got {frames.dtype}")
        if B == 0:
            raise ValueError("frames: empty batch (B=0)")
        return B

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.assemble(self.frame_features(frames))

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """The per-frame part: (B, T, ...) frames -> (B, T, N, C) pooled trunk tokens. Each frame is processed on its
        own, so clips that share frames (overlapping windows of one video) can share these (`assemble`)."""
        B, T = frames.shape[:2]
        images = self.preprocess(frames).to(self.temporal_pos.dtype)
        grid = self._trunk_tokens(images)  # (B*T, gh, gw, C)
        if self.cfg.pool > 1:
            pool = F.max_pool2d if self.cfg.pool_mode == "max" else F.avg_pool2d
            grid = pool(grid.permute(0, 3, 1, 2), self.cfg.pool, ceil_mode=True).permute(0, 2, 3, 1)
        return grid.reshape(B, T, -1, self.width)

    def assemble(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, N, C) `frame_features` -> (B, T * N, out_width) tokens: temporal position (+ change channels)."""
        B, T = feats.shape[:2]
        if not 1 <= T <= self.cfg.max_frames:
            raise ValueError(f"frame features: T={T} frames given, expected 1..{self.cfg.max_frames} "
                             f"(model.vision.max_frames)")
        tokens = feats + self.temporal_pos[:T, None, :]
        if self.cfg.motion:  # change since the previous frame, zero for the first: (0, 0) pads on C and N, (1, 0) on T
            tokens = torch.cat([tokens, F.pad(feats.diff(dim=1), (0, 0, 0, 0, 1, 0))], -1)
        return tokens.reshape(B, -1, self.out_width)
