"""The native extension `ville_kernels._C` (csrc/): loads it and says whether it loaded. Importing `_C` registers
its CPU kernels (TORCH_LIBRARY_IMPL) for the custom ops whose schemas library.py defines; the ops' fake kernels,
CUDA kernels, autograd and wrappers live beside their Triton code in infonce.py and decode_attention.py.

`LOADED` says whether the CPU kernels exist (when they do not, `fused_infonce` / `decode_attention` use their
PyTorch paths on CPU, see dispatch.backends()). `LOAD_ERROR` keeps the reason, e.g. "not built" or an import error.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import library  # noqa: F401  (the schemas exist before _C registers kernels for them)


def _load() -> tuple[bool, str]:
    if os.environ.get("VILLE_NO_EXT", "0") == "1":
        return False, "VILLE_NO_EXT=1"
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return False, "not built"
    try:
        from . import _C  # registers the CPU kernels
    except Exception as exc:  # built against another torch, missing symbols, ...: fall back, but say so once
        warnings.warn(f"ville_kernels: native CPU kernels failed to load ({exc}); using the PyTorch paths")
        return False, f"{type(exc).__name__}: {exc}"
    if _C.torch_version != torch.__version__:
        why = f"built for torch {_C.torch_version}, running {torch.__version__}; reinstall to rebuild"
        warnings.warn(f"ville_kernels: native CPU kernels not used ({why}); using the PyTorch paths")
        return False, why
    return True, ""


LOADED, LOAD_ERROR = _load()
