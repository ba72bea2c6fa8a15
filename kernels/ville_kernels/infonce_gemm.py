"""The InfoNCE backward as recompute + two cuBLAS GEMMs: the "gemm" provider of `infonce._infonce_bwd`.

Shape letters as in infonce.py (N rows q, M columns p, D features, s logit_scale); R rows of one chunk.

The one-pass "atomic" backward (`_infonce_bwd_kernel`) forms each BLOCK_N x BLOCK_M tile of G = dloss/dlogits and
multiplies it into dq and dp itself: its two dots per BLOCK_D slice have a free dimension of BLOCK_D (16), far
below what Hopper's wgmma wants, and it adds N * M * D * (1 / BLOCK_M + 1 / BLOCK_N) fp32 atomics, ~1e11 at
N = M = 64k, D = 1024. This provider splits the work at G instead: for row chunks [r0, r0 + R)

    1. `_infonce_grad_chunk_kernel` recomputes the chunk's logits against all M columns (one similarity pass) and
       writes H = softmax_row + (w_col / w_row) * softmax_col on the negative pairs, times `_grad_tile_scale`, as an
       R x M matrix G in the input dtype (fp32 for fp32 inputs), 0 elsewhere. It also adds each row's and column's
       negative softmax mass and one ds partial per row block (fp32, from the unrounded H), with O(R * M / tile)
       atomics instead of O(R * M * D / tile).
    2. dq[r0:r0+R] = G @ p and dp += G^T @ q[r0:r0+R] on cuBLAS with fp32 output (`torch.mm(..., out_dtype=float32)`,
       `torch.addmm` accumulating into dp where torch allows an fp32 accumulator with 16-bit operands).
    3. After the last chunk, dq and dp are multiplied by g * w_row * s / tile_scale: as in the atomic kernel, only the
       softmax part is rounded to 16 bits, never the small factors (fp16 would flush them to zero at large N).

Same arithmetic as the atomic kernel (same G entries, fp32 accumulation); the sums only run in another order. fp32
inputs: G stays fp32 and the GEMMs follow torch's fp32 matmul precision setting (full fp32 unless the caller allows
TF32), where the atomic kernel's dots are always full fp32.
The G chunk is the provider's only large buffer: R = the most rows, a multiple of BLOCK_N, whose G fits in
`GEMM_CHUNK_BYTES` (256 MB: R = 2048 at M = 64k in bf16, 128 at M = 1M). The dp GEMM reads and writes dp (M x D
fp32) once per chunk, so a small R makes it memory-bound: at M = 1M raise GEMM_CHUNK_BYTES (a module setting the
benchmark flips; bench/bench_infonce.py --gemm-chunk-mb) if memory allows.
Which provider runs: VILLE_INFONCE_BWD=atomic|gemm (default atomic, see ville_kernels.dispatch), read at each call.
"""
from __future__ import annotations

import functools

import torch

from .infonce import _LOG2E, _grad_tile_scale, _launch_common, _register_cap, triton

if triton is not None:
    import triton.language as tl

    from .infonce import _grouped_block, _infonce_logit_tile, _infonce_negatives

__all__ = ["GEMM_CHUNK_BYTES", "gemm_chunk_rows"]

GEMM_CHUNK_BYTES = 256 << 20  # the G chunk's budget (see the module docstring)

if triton is not None:

    @triton.jit
    def _infonce_grad_chunk_kernel(
        Q, P, SCALE, LABELS, ROW_GROUPS, COL_GROUPS, LSE_ROW, LSE_COL, G, DSCALE_PART, NEG_ROW, NEG_COL,
        N, M, D, ROW0, ROWS, stride_qn, stride_qd, stride_pm, stride_pd, stride_gn,
        col_ratio, tile_scale,
        HAS_GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP_N: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    ):
        """Program (row block, column block) of the chunk rows [ROW0, ROW0 + ROWS): recompute the tile, store
        tile_scale * H (H = softmax_row + col_ratio * softmax_col on negative pairs, 0 on the others) into G
        (ROWS, M) in G's dtype; atomically add sum(H * q.p) to DSCALE_PART[global row block] and the negatives'
        softmax mass to NEG_ROW (N,) and NEG_COL (M,). LSE_*: full log-sum-exps in log2 units, LSE_COL = +inf for
        columns that are no row's label. ROW0 is a multiple of BLOCK_N."""
        rb, cb = _grouped_block(tl.program_id(0), tl.cdiv(ROWS, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

        local = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = ROW0 + local
        cols = cb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = local < ROWS
        col_in = cols < M
        scale = tl.load(SCALE).to(tl.float32)

        raw = _infonce_logit_tile(Q, P, rows, cols, row_in, col_in, D, stride_qn, stride_qd, stride_pm, stride_pd,
                                  BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, INTERPRET_BF16)
        negative = _infonce_negatives(rows, cols, row_in, col_in, LABELS, ROW_GROUPS, COL_GROUPS, HAS_GROUPS)
        # Positives and removed pairs sit at -1e30, so their entries of H are exactly 0.
        x = tl.where(negative, raw * (scale * 1.4426950408889634), -1.0e30)
        lse_row = tl.load(LSE_ROW + rows, mask=row_in, other=0.0)
        h = tl.exp2(x - lse_row[:, None])
        tl.atomic_add(NEG_ROW + rows, tl.sum(h, 1), mask=row_in, sem="relaxed")
        if SYMMETRIC:
            lse_col = tl.load(LSE_COL + cols, mask=col_in, other=float("inf"))
            soft_col = tl.exp2(x - lse_col[None, :])
            tl.atomic_add(NEG_COL + cols, tl.sum(soft_col, 0), mask=col_in, sem="relaxed")
            h += col_ratio * soft_col
        tl.atomic_add(DSCALE_PART + ROW0 // BLOCK_N + rb, tl.sum(tl.sum(h * raw, 1), 0), sem="relaxed")

        h = h * tile_scale
        if INTERPRET_BF16:
            # The interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand (as the GPU's cast does),
            # so that the store below only drops zero bits.
            bits = h.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            h = bits.to(tl.float32, bitcast=True)
        g_ptrs = G + local.to(tl.int64)[:, None] * stride_gn + cols[None, :]
        tl.store(g_ptrs, h.to(G.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


def _gemm_block_sizes(dtype: torch.dtype, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps) of the recompute kernel; under the interpreter the smallest tl.dot
    tiles. GPU: compiled for sm_90 and sm_80 (ville_kernels.compile_report), not timed on hardware. The forward's
    128 x 128 16-bit tile spilled 96 bytes on sm_90 in the symmetric variants (logits, row and column softmax live
    at once); 64 x 128 takes 135-152 registers without spills, BLOCK_M = 128 keeps G's row stores 256 bytes wide."""
    if interpret:
        return 16, 16, 16, 1
    return (64, 64, 8, 8) if dtype == torch.float32 else (64, 128, 16, 8)


def gemm_chunk_rows(N: int, M: int, dtype: torch.dtype, block_n: int, budget: int | None = None) -> int:
    """Rows R of one G chunk: the most whole row blocks whose R x M matrix in `dtype` fits `budget` bytes
    (GEMM_CHUNK_BYTES), at least one row block, at most N rounded up to a row block."""
    budget = GEMM_CHUNK_BYTES if budget is None else budget
    fitting = budget // (max(M, 1) * torch.finfo(dtype).bits // 8)
    rows = max(block_n, fitting // block_n * block_n)
    return min(rows, -(-N // block_n) * block_n)


@functools.lru_cache(maxsize=None)
def _fp32_addmm_accumulates(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm takes an fp32 accumulator with `dtype` operands (out_dtype=float32). Older torch
    requires the accumulator to have the operands' dtype; then the provider adds an fp32 product instead."""
    a = torch.zeros(2, 2, device=device, dtype=dtype)
    acc = torch.zeros(2, 2, device=device, dtype=torch.float32)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output and fp32 accumulation, for 16-bit operands on cuBLAS without an upcast copy. On CPU
    (interpreter tests) the operands are upcast: 16-bit products are exact in fp32, so the arithmetic is the same."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc fp32 (see _mm_fp32)."""
    if a.is_cuda and a.dtype != torch.float32 and _fp32_addmm_accumulates(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda and a.dtype != torch.float32:
        acc += _mm_fp32(a, b)
    else:
        acc.addmm_(a.float(), b.float())


def _infonce_bwd_gemm(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col, w_row, w_col,
                      symmetric):
    """The gemm provider of `infonce._infonce_bwd`, same arguments and results: fp32 dq (N, D), dp (M, D), ds (),
    the negatives' softmax mass per row (N,) and per column (M,) or None."""
    a = _launch_common(q, p, logit_scale, labels, row_groups, col_groups)
    q, p = a["q"], a["p"]
    (N, D), M = q.shape, p.shape[0]
    block_n, block_m, block_d, num_warps = _gemm_block_sizes(q.dtype, a["interpret"])
    chunk = gemm_chunk_rows(N, M, q.dtype, block_n)
    g_chunk = torch.empty(min(chunk, N), M, dtype=q.dtype, device=q.device)
    dq = torch.empty(N, D, dtype=torch.float32, device=q.device)
    dp = torch.zeros(M, D, dtype=torch.float32, device=q.device)
    ds_part = torch.zeros(triton.cdiv(N, block_n), dtype=torch.float32, device=q.device)
    neg_row = torch.zeros(N, dtype=torch.float32, device=q.device)
    neg_col = torch.zeros(M, dtype=torch.float32, device=q.device) if symmetric else neg_row
    lse_row2 = (lse_row * _LOG2E).contiguous()
    lse_col2 = (lse_col * _LOG2E).contiguous() if symmetric else lse_row2
    tile_scale = _grad_tile_scale(q.dtype)
    for r0 in range(0, N, chunk):
        rows = min(chunk, N - r0)
        g = g_chunk[:rows]
        _infonce_grad_chunk_kernel[(triton.cdiv(rows, block_n) * triton.cdiv(M, block_m),)](
            q, p, a["scale"], a["labels"], a["row_groups"], a["col_groups"], lse_row2, lse_col2, g, ds_part,
            neg_row, neg_col, N, M, D, r0, rows, q.stride(0), q.stride(1), p.stride(0), p.stride(1), g.stride(0),
            w_col / w_row, tile_scale,
            HAS_GROUPS=a["has_groups"], SYMMETRIC=symmetric, GROUP_N=8,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PRECISION=a["precision"], INTERPRET_BF16=a["interpret_bf16"],
            num_warps=num_warps, num_stages=3, **_register_cap(a["interpret"]),
        )
        dq[r0:r0 + rows] = _mm_fp32(g, p)
        _addmm_fp32_(dp, g.T, q[r0:r0 + rows])
    factor = grad.detach().to(torch.float32) * w_row
    out_factor = factor * logit_scale.detach().to(torch.float32) / tile_scale
    return dq.mul_(out_factor), dp.mul_(out_factor), ds_part.sum() * factor, neg_row, (neg_col if symmetric else None)

