"""ville_kernels: the fused ops behind ville's hot paths. A standalone library: it never imports `ville`.

- `fused_infonce` / `infonce_ref`: contrastive similarity + symmetric InfoNCE without materialising N x M logits.
- `decode_attention` / `decode_attention_ref`: one-token decode attention over per-sample KV caches with
  `batch_idx` compaction (finished samples drop out without copying caches).

The source lives in `kernels/ville_kernels/`; `kernels/` itself is no package, so a checkout's root on `sys.path`
never hides the unrelated PyPI package `kernels` that transformers imports (docs/design.md, "Layout").
"""
from .dispatch import backends, use_triton
from .infonce import fused_infonce, infonce_ref
from .infonce_parts import (NO_NEGATIVE, infonce_add_positive_grads, infonce_backward_from_lse, infonce_negative_lse,
                            infonce_positive_dots)
from .decode_attention import decode_attention, decode_attention_ref

__all__ = ["backends", "use_triton", "fused_infonce", "infonce_ref", "decode_attention", "decode_attention_ref"]
__all__ += ["NO_NEGATIVE", "infonce_negative_lse", "infonce_backward_from_lse", "infonce_positive_dots",
            "infonce_add_positive_grads"]
