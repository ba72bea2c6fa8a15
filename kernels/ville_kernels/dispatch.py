"""Which implementation an op runs on a given tensor.

Rule (shared/STYLE.md): CUDA tensors -> Triton; CPU tensors -> the CPU path (the native csrc kernels when the
extension `ville_kernels._C` was built and loads, else chunked PyTorch), except under `TRITON_INTERPRET=1`, where the
Triton code itself runs on the CPU so CI can test it.

Environment variables read by ville_kernels (README "Environment variables" lists every one the project reads):
- TRITON_INTERPRET=1   run the Triton kernels on CPU tensors through Triton's interpreter (slow; tests only).
- VILLE_KERNELS=torch  never use Triton or csrc: the PyTorch paths everywhere (debugging / A-B comparisons).
- VILLE_NO_EXT=1       at build time: skip compiling csrc; at import: do not load the built extension.
- VILLE_INFONCE_BWD=atomic|gemm  which Triton InfoNCE backward runs (read at each call; default atomic): the one-pass
                       tile kernel with fp32 atomics, or recompute + two cuBLAS GEMMs (ville_kernels/infonce_gemm.py).
"""
from __future__ import annotations

import os

import torch

from . import native


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


def forced_torch() -> bool:
    return os.environ.get("VILLE_KERNELS", "") == "torch"


def use_csrc(*tensors: torch.Tensor) -> bool:
    """True when the op should run its native CPU kernel (csrc) on these tensors."""
    if forced_torch() or not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
        return False  # non-tensors: the op's own checks raise the ValueError
    if use_triton(*tensors):
        return False
    return native.LOADED


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is slow)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def backends() -> dict[str, dict[str, str]]:
    """Which backend each op uses on each device, e.g.
    {"infonce": {"cpu": "csrc", "cuda": "triton"}, "decode_attention": {"cpu": "csrc", "cuda": "triton"}}.
    CPU: "triton-interpret" (TRITON_INTERPRET=1), "csrc" (extension loaded) or the PyTorch path."""
    no_triton = forced_torch() or not triton_available()
    cuda = "torch" if no_triton else "triton"
    if triton_interpret() and not no_triton:
        cpu = {"infonce": "triton-interpret", "decode_attention": "triton-interpret"}
    elif native.LOADED and not forced_torch():
        cpu = {"infonce": "csrc", "decode_attention": "csrc"}
    else:
        cpu = {"infonce": "torch-chunked", "decode_attention": "torch"}
    return {op: {"cpu": cpu[op], "cuda": cuda} for op in ("infonce", "decode_attention")}
