"""Which implementation an op runs on a given tensor.

Rule (shared/STYLE.md): CUDA tensors -> Triton; CPU tensors -> the CPU path (chunked PyTorch or csrc), except under
`TRITON_INTERPRET=1`, where the Triton code itself runs on the CPU so CI can test it.

Environment variables read by ville_kernels (README "Environment variables" lists every one the project reads):
- TRITON_INTERPRET=1   run the Triton kernels on CPU tensors through Triton's interpreter (slow; tests only).
- VILLE_KERNELS=torch  never use Triton, even on CUDA (debugging / A-B comparisons).
"""
from __future__ import annotations

import os

import torch


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    if os.environ.get("VILLE_KERNELS", "") == "torch" or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return triton_interpret() and all(t.device.type == "cpu" for t in tensors)


def backends() -> dict[str, dict[str, str]]:
    """Which backend each op uses on each device, e.g. {"infonce": {"cpu": "torch-chunked", "cuda": "triton"}}."""
    forced_torch = os.environ.get("VILLE_KERNELS", "") == "torch" or not triton_available()
    cuda = "torch" if forced_torch else "triton"
    cpu_triton = triton_interpret() and not forced_torch
    return {
        "infonce": {"cpu": "triton-interpret" if cpu_triton else "torch-chunked", "cuda": cuda},
        "decode_attention": {"cpu": "triton-interpret" if cpu_triton else "torch", "cuda": cuda},
    }
