"""The custom-op namespace `torch.ops.ville_kernels`: the one `Library("ville_kernels", "DEF")` and every op's
schema. Nothing else is registered here: each op module registers its own fake (meta) kernel, CUDA kernel, autograd
and wrapper on `lib` (infonce.py, decode_attention.py), and the native extension `ville_kernels._C` (csrc/, loaded
by native.py) registers the CPU kernels with TORCH_LIBRARY_IMPL.

The schemas live apart from the op modules so that native.py can make them exist before it loads `_C`, without
importing the op modules. Shape letters as in kernels/ville_kernels/infonce.py and decode_attention.py.
"""
from __future__ import annotations

import torch

lib = torch.library.Library("ville_kernels", "DEF")
lib.define("infonce_fwd(Tensor q, Tensor p, Tensor logit_scale, Tensor labels, Tensor? row_groups, "
           "Tensor? col_groups, bool symmetric) -> (Tensor loss, Tensor x_pos, Tensor z_row, Tensor z_col)")
lib.define("infonce_bwd(Tensor grad, Tensor q, Tensor p, Tensor logit_scale, Tensor labels, Tensor? row_groups, "
           "Tensor? col_groups, Tensor x_pos, Tensor z_row, Tensor z_col, bool symmetric) "
           "-> (Tensor dq, Tensor dp, Tensor dscale)")
lib.define("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor? batch_idx, "
           "float scale, float? softcap, int? window) -> Tensor")
