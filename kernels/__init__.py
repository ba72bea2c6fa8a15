"""ville_kernels: the fused ops behind ville's hot paths. A standalone library: it never imports `ville`.

- `fused_infonce` / `infonce_ref`: contrastive similarity + symmetric InfoNCE without materialising N x M logits.
- `decode_attention` / `decode_attention_ref`: one-token decode attention over per-sample KV caches with
  `batch_idx` compaction (finished samples drop out without copying caches).
"""
if __name__ == "ville_kernels":
    from .dispatch import backends, use_triton
    from .infonce import fused_infonce, infonce_ref
    from .decode_attention import decode_attention, decode_attention_ref

    __all__ = ["backends", "use_triton", "fused_infonce", "infonce_ref", "decode_attention", "decode_attention_ref"]
# Otherwise this folder was imported as the bare name `kernels` because the repository root is on sys.path
# (`python -m ...` from the root). transformers probes for the unrelated PyPI package `kernels` that way; staying
# empty (no __version__) makes that probe answer "not installed" instead of importing our ops twice.
