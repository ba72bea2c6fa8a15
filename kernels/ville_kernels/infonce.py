"""Fused contrastive similarity + InfoNCE: loss and gradients without ever writing the N x M logits.

Shape letters (kernels, launchers, CPU path):
    N        rows: queries q (N, D)                  M        columns: candidates p (M, D), M >= N with hard negatives
    D        features (<= 4096, any value)           s        logit_scale, the multiplier (already exponentiated)
    BLOCK_N x BLOCK_M   one logit tile               BLOCK_D  features per tl.dot step (the D loop)
    TILES_N x TILES_M   tiles per forward program (a "super-tile"); SN x SM super-tiles cover the logits

Reading order: Triton kernels, launchers (grids, block sizes, contiguity), the chunked CPU path,
`InfoNCEFunction`, the custom ops `torch.ops.ville_kernels.infonce_fwd / infonce_bwd` (fake and CUDA kernels,
autograd, wrapper; schemas in library.py, CPU kernels in csrc/infonce.cpp), the public `fused_infonce`. The
specification is `infonce_ref` (kernels/ville_kernels/infonce_ref.py).

Organisation (why it looks like this):
- The positive pair of each row is handled in closed form. The tiles only compute log-sum-exps over the *negatives*
  (lse_neg), the positive logit x_pos comes from an O(N * D) gather, and with z = lse_neg - x_pos a row's loss is
  softplus(z). That stays accurate when the positive dominates, where lse - x_pos would subtract two numbers of
  size s (~100) to get a loss of ~1e-6. The column direction is the same with column j's positive row.
- Forward, one pass over the similarity for both directions, on a persistent grid (one program per resident block,
  `_resident_programs`) that walks super-tiles of TILES_N x TILES_M tiles round-robin; `_forward_tiling` sizes them so
  every SM gets about the same work. For each row block of super-tile (sn, sm) the program sweeps its column tiles
  keeping the row (max, sum) online in registers, and writes one partial (max, sum) per row per super-column
  (ROW_MAX / ROW_SUM, N x SM). Column statistics of each tile are merged online into a per-super-row scratch
  (COL_MAX / COL_SUM, SN x M) that only this super-tile touches, so no atomics are needed and the result is
  deterministic. The host merges the SM row partials and the SN column
  partials. Scratch is O((N + M) * sqrt(super-tiles)), a few MB to ~110 MB at N = M = 256k, instead of the
  N * M / BLOCK_N that "one partial per row block" would cost. Atomics would avoid the scratch but a (max, sum) pair
  cannot be merged by one atomic, and a locked merge serialises the column tiles.
- Saved for backward: x_pos, z_row, z_col (O(N)); the full LSEs are x_pos + softplus(z).
- Backward, one pass with atomics: program (row block, column block) recomputes its tile, forms
  G = g * (w_row * softmax_row + w_col * softmax_col) on the negative pairs (only the softmax part is rounded to the
  input dtype, the small factors multiply the fp32 dot results: see _infonce_bwd_kernel), then for each BLOCK_D
  slice adds G @ p into dq and G^T @ q into dp with fp32 atomics; it also sums each row's and column's negative
  softmax mass.
  The alternative (a dq pass over row blocks plus a dp pass over column blocks, no atomics) recomputes the
  similarity twice, 4 matmul passes instead of 3; and a register accumulator for a BLOCK_N x D slab does not fit
  once D is in the thousands. The positive pair's entry of G is minus that mass (softmax - 1 = -sum of the others):
  the host adds it in fp32, outside the low-precision tile G, and because it is summed from the very probabilities
  the negatives used, every row and column of G sums to zero as it should.
- A second backward provider, VILLE_INFONCE_BWD=gemm (infonce_gemm.py; default atomic until an H100 run of
  bench/bench_infonce.py picks the winner): the tile's two dots above have a free dimension of only BLOCK_D (small
  wgmma shapes on Hopper) and cost ~1e11 fp32 atomics at N = M = 64k, D = 1024. "gemm" recomputes row chunks of the
  logits into G in the input dtype and runs dq = G @ p and dp += G^T @ q as cuBLAS GEMMs; same G entries, fp32
  accumulation, O(N * M / tile) atomics, a G chunk of at most 256 MB.
Block sizes (`_block_sizes`) and the register cap were chosen to compile for sm_90 and sm_80 without register spills
(ville_kernels.compile_report); they are not tuned on hardware.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from .dispatch import sm_count, use_csrc, use_triton
from .infonce_ref import MAX_D, check_infonce_inputs, infonce_ref
from .library import lib

try:
    import triton
    import triton.language as tl
except Exception:  # triton is Linux-only; the chunked torch path and the reference work without it
    triton = None

__all__ = ["fused_infonce", "infonce_ref", "InfoNCEFunction", "MAX_D"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Masked logits (positives, removed pairs, padding) are a finite "minus infinity" in the kernels: with -inf, a tile
# row or column that is entirely masked would give exp2(-inf - -inf) = NaN in the online update. With -1e30 it gives
# 1 per masked entry, which the first real logit of that row/column wipes out (its rescale factor exp2(-1e30 - x) is
# 0). A row or column with no negative at all ends near -1e30, an LSE the host turns into softplus(-huge) = 0 loss.
_NEG = -1.0e30

if triton is not None:

    @triton.jit
    def _infonce_logit_tile(Q, P, rows, cols, row_in, col_in, D, stride_qn, stride_qd, stride_pm, stride_pd,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
        """Unscaled similarity q[rows] . p[cols]^T of one tile, fp32 (BLOCK_N, BLOCK_M), accumulated over D."""
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd
        # p is read as (BLOCK_D, BLOCK_M) so the dot needs no transpose of a register tile.
        p_ptrs = P + cols.to(tl.int64)[None, :] * stride_pm + offs_d[:, None] * stride_pd
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            d_in = (k + offs_d) < D
            a = tl.load(q_ptrs, mask=row_in[:, None] & d_in[None, :], other=0.0)
            b = tl.load(p_ptrs, mask=d_in[:, None] & col_in[None, :], other=0.0)
            if INTERPRET_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            q_ptrs += BLOCK_D * stride_qd
            p_ptrs += BLOCK_D * stride_pd
        return acc

    @triton.jit
    def _grouped_block(pid, blocks_n, blocks_m, GROUP_N: tl.constexpr):
        """(row block, column block) of program `pid` in grouped order: GROUP_N row blocks sweep the columns
        together, so a p tile is reused from L2."""
        width = GROUP_N * blocks_m
        first_rb = (pid // width) * GROUP_N
        group_size = tl.minimum(blocks_n - first_rb, GROUP_N)
        return first_rb + (pid % width) % group_size, (pid % width) // group_size

    @triton.jit
    def _infonce_negatives(rows, cols, row_in, col_in, LABELS, ROW_GROUPS, COL_GROUPS, HAS_GROUPS: tl.constexpr):
        """Mask of a tile's negative pairs: in range, not the row's positive, not removed by groups (same group)."""
        labels = tl.load(LABELS + rows, mask=row_in, other=-1).to(tl.int32)  # int32 masks: half the registers
        positive = labels[:, None] == cols[None, :]
        negative = row_in[:, None] & col_in[None, :] & ~positive
        if HAS_GROUPS:
            row_groups = tl.load(ROW_GROUPS + rows, mask=row_in, other=0)
            col_groups = tl.load(COL_GROUPS + cols, mask=col_in, other=0)
            negative = negative & (row_groups[:, None] != col_groups[None, :])
        return negative

    @triton.jit
    def _infonce_fwd_super_tile(
        Q, P, scale2, LABELS, ROW_GROUPS, COL_GROUPS, ROW_MAX, ROW_SUM, COL_MAX, COL_SUM,
        N, M, D, stride_qn, stride_qd, stride_pm, stride_pd, TILES_N, TILES_M, SUPERS_M, sn, sm,
        HAS_GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    ):
        """Super-tile (sn, sm) of `_infonce_fwd_kernel`: its row blocks, each sweeping its column tiles."""
        rb_lo = sn * TILES_N
        rb_hi = tl.minimum(rb_lo + TILES_N, tl.cdiv(N, BLOCK_N))
        cb_lo = sm * TILES_M
        cb_hi = tl.minimum(cb_lo + TILES_M, tl.cdiv(M, BLOCK_M))
        for rb in range(rb_lo, rb_hi):
            rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
            row_in = rows < N
            m_row = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
            l_row = tl.zeros([BLOCK_N], dtype=tl.float32)
            for cb in range(cb_lo, cb_hi):
                cols = cb * BLOCK_M + tl.arange(0, BLOCK_M)
                col_in = cols < M
                x = _infonce_logit_tile(Q, P, rows, cols, row_in, col_in, D, stride_qn, stride_qd, stride_pm,
                                        stride_pd, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, INTERPRET_BF16)
                negative = _infonce_negatives(rows, cols, row_in, col_in, LABELS, ROW_GROUPS, COL_GROUPS,
                                              HAS_GROUPS)
                x = tl.where(negative, x * scale2, -1.0e30)

                m_new = tl.maximum(m_row, tl.max(x, 1))
                l_row = l_row * tl.exp2(m_row - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
                m_row = m_new

                if SYMMETRIC:
                    m_tile = tl.max(x, 0)
                    l_tile = tl.sum(tl.exp2(x - m_tile[None, :]), 0)
                    c_offs = sn.to(tl.int64) * M + cols
                    m_old = tl.load(COL_MAX + c_offs, mask=col_in, other=-1.0e30)
                    l_old = tl.load(COL_SUM + c_offs, mask=col_in, other=0.0)
                    m_col = tl.maximum(m_old, m_tile)
                    l_col = l_old * tl.exp2(m_old - m_col) + l_tile * tl.exp2(m_tile - m_col)
                    tl.store(COL_MAX + c_offs, m_col, mask=col_in)
                    tl.store(COL_SUM + c_offs, l_col, mask=col_in)
                    # The next row block reads these columns back, possibly from other threads of this program:
                    # the barrier orders the global stores before those loads.
                    tl.debug_barrier()
            r_offs = rows.to(tl.int64) * SUPERS_M + sm
            tl.store(ROW_MAX + r_offs, m_row, mask=row_in)
            tl.store(ROW_SUM + r_offs, l_row, mask=row_in)

    @triton.jit
    def _infonce_fwd_kernel(
        Q, P, SCALE, LABELS, ROW_GROUPS, COL_GROUPS, ROW_MAX, ROW_SUM, COL_MAX, COL_SUM,
        N, M, D, stride_qn, stride_qd, stride_pm, stride_pd,
        TILES_N, TILES_M, SUPERS_M, SUPERS,
        HAS_GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    ):
        """Persistent: program pid handles super-tiles pid, pid + programs, ... of the SUPERS = SN x SM. Super-tile
        (sn, sm): online (max, sum) over the *negatives* of each row, written to ROW_*[:, sm] (N x SM), and of each
        column, merged into COL_*[sn, :] (SN x M, initialised by the host). Each (row, sm) and (sn, column) entry
        belongs to exactly one super-tile, so no two programs touch the same scratch.

        Logits are handled in log2 units (x * s * log2(e)) so the exponentials are the native exp2."""
        scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
        for tile in range(tl.program_id(0), SUPERS, tl.num_programs(0)):
            _infonce_fwd_super_tile(
                Q, P, scale2, LABELS, ROW_GROUPS, COL_GROUPS, ROW_MAX, ROW_SUM, COL_MAX, COL_SUM,
                N, M, D, stride_qn, stride_qd, stride_pm, stride_pd, TILES_N, TILES_M, SUPERS_M,
                tile // SUPERS_M, tile % SUPERS_M, HAS_GROUPS, SYMMETRIC, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION,
                INTERPRET_BF16)

    @triton.jit
    def _infonce_bwd_kernel(
        Q, P, SCALE, GRAD, LABELS, ROW_GROUPS, COL_GROUPS, LSE_ROW, LSE_COL, DQ, DP, DSCALE_PART, NEG_ROW, NEG_COL,
        N, M, D, stride_qn, stride_qd, stride_pm, stride_pd,
        w_row, col_ratio, tile_scale,
        HAS_GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP_N: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    ):
        """Program (row block, column block): recompute the tile and form G = dloss/dlogits on the *negative* pairs,
        g * w_row * (softmax_row + col_ratio * softmax_col) with col_ratio = w_col / w_row; atomically add s*G @ p
        into DQ and s*G^T @ q into DP (fp32, (N, D) and (M, D)); atomically add sum(G * q.p) to DSCALE_PART[row
        block]; atomically add the softmax mass of the negatives to NEG_ROW (N,) and NEG_COL (M,). The host adds the
        positive pairs, whose entry of G is minus that mass.

        Only the softmax part H = softmax_row + col_ratio * softmax_col (entries in [0, 2]) is rounded to the input
        dtype for the dots, times `tile_scale` (a power of two); the small factors g * w_row * s / tile_scale
        multiply the fp32 dot results. Folding w_row = 0.5 / N and s into the tile before an fp16 cast flushes the
        negatives to zero at large N (at N = 64k, s = 14.3 every negative's term was below fp16's smallest
        subnormal); fp16's tile_scale 2^14 lifts H into its normal range (2 * 2^14 < 65504): entries below 3.7e-9
        become subnormal with an absolute error under 1.8e-12 each, under 2e-6 over a row of 1M (H's rows sum to
        at most 2), where the old order lost every negative.

        LSE_ROW / LSE_COL: full log-sum-exps in log2 units, LSE_COL = +inf for columns that are no row's label."""
        rb, cb = _grouped_block(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = cb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < N
        col_in = cols < M
        scale = tl.load(SCALE).to(tl.float32)
        g = tl.load(GRAD).to(tl.float32)

        raw = _infonce_logit_tile(Q, P, rows, cols, row_in, col_in, D, stride_qn, stride_qd, stride_pm, stride_pd,
                                  BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, INTERPRET_BF16)
        negative = _infonce_negatives(rows, cols, row_in, col_in, LABELS, ROW_GROUPS, COL_GROUPS, HAS_GROUPS)
        # Positives and removed pairs sit at -1e30, so their exponentials below are exactly 0.
        x = tl.where(negative, raw * (scale * 1.4426950408889634), -1.0e30)
        lse_row = tl.load(LSE_ROW + rows, mask=row_in, other=0.0)
        soft_row = tl.exp2(x - lse_row[:, None])
        tl.atomic_add(NEG_ROW + rows, tl.sum(soft_row, 1), mask=row_in, sem="relaxed")
        grad = soft_row
        if SYMMETRIC:
            lse_col = tl.load(LSE_COL + cols, mask=col_in, other=float("inf"))
            soft_col = tl.exp2(x - lse_col[None, :])
            tl.atomic_add(NEG_COL + cols, tl.sum(soft_col, 0), mask=col_in, sem="relaxed")
            grad += col_ratio * soft_col
        factor = g * w_row
        tl.atomic_add(DSCALE_PART + rb, tl.sum(tl.sum(grad * raw, 1), 0) * factor, sem="relaxed")
        out_factor = factor * scale / tile_scale

        grad = grad * tile_scale
        if INTERPRET_BF16:
            # The interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand so G carries the same
            # rounding as on the GPU, then keep fp32 (bf16 x bf16 products are exact in fp32).
            bits = grad.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            grad_lo = bits.to(tl.float32, bitcast=True)
        else:
            grad_lo = grad.to(Q.dtype.element_ty)
        grad_lo_t = tl.trans(grad_lo)

        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd
        p_ptrs = P + cols.to(tl.int64)[:, None] * stride_pm + offs_d[None, :] * stride_pd
        dq_ptrs = DQ + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
        dp_ptrs = DP + cols.to(tl.int64)[:, None] * D + offs_d[None, :]
        for k in range(0, D, BLOCK_D):
            d_in = (k + offs_d) < D
            q_c = tl.load(q_ptrs, mask=row_in[:, None] & d_in[None, :], other=0.0)
            p_c = tl.load(p_ptrs, mask=col_in[:, None] & d_in[None, :], other=0.0)
            if INTERPRET_BF16:
                q_c = q_c.to(tl.float32)
                p_c = p_c.to(tl.float32)
            dq_c = tl.dot(grad_lo, p_c, input_precision=DOT_PRECISION) * out_factor
            dp_c = tl.dot(grad_lo_t, q_c, input_precision=DOT_PRECISION) * out_factor
            tl.atomic_add(dq_ptrs, dq_c, mask=row_in[:, None] & d_in[None, :], sem="relaxed")
            tl.atomic_add(dp_ptrs, dp_c, mask=col_in[:, None] & d_in[None, :], sem="relaxed")
            q_ptrs += BLOCK_D * stride_qd
            p_ptrs += BLOCK_D * stride_pd
            dq_ptrs += BLOCK_D
            dp_ptrs += BLOCK_D


def _kernels_interpreted() -> bool:
    return triton is not None and not isinstance(_infonce_fwd_kernel, triton.runtime.jit.JITFunction)


_INTERPRET_PROGRAMS = 2  # pretend device size under TRITON_INTERPRET: small shapes still get multi-tile programs
# Registers per thread for both kernels (ptxas' .maxnreg). Uncapped, ptxas took 243-255 of the 255 an 8-warp block
# may have and the 16-bit forward spilled 320 bytes on sm_80; under 232 with the tiles of _block_sizes every variant
# compiles without spills for sm_90 and sm_80. Caps of 128 (two 8-warp blocks per SM) spilled 200-1000 bytes.
_MAX_REGISTERS = 232
_BLOCKS_PER_SM = 65536 // (_MAX_REGISTERS * 32 * 8)


def _resident_programs(device: torch.device) -> int:
    """Programs of the persistent forward: every SM's resident blocks, from the device's SM count at run time."""
    return _BLOCKS_PER_SM * sm_count(device) if device.type == "cuda" else _INTERPRET_PROGRAMS


def _register_cap(interpret: bool) -> dict:
    return {} if interpret else {"maxnreg": _MAX_REGISTERS}


def _block_sizes(dtype: torch.dtype, interpret: bool, backward: bool, symmetric: bool = True
                 ) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps). Under the interpreter a tile costs Python time, so tiles are the
    smallest tl.dot accepts. GPU choices: the largest tiles that compile for sm_90 and sm_80 without register spills
    under the _MAX_REGISTERS cap, every variant (ville_kernels.compile_report; tests/kernels/test_kernel_compile.py);
    not yet timed on hardware."""
    if interpret:
        return 16, 16, 16, 1
    if dtype == torch.float32:
        return (64, 64, 16, 8) if backward else (64, 64, 8, 8)
    if backward:
        return 64, 128, 16, 8
    # The row-only 16-bit forward with groups spilled 16 bytes at 128 x 128 on sm_80 (232 registers, the cap);
    # 128 x 64 compiles at 168-197 with no spill on sm_90 and sm_80 (the full VILLE_COMPILE_ALL sweep).
    return (128, 128, 16, 8) if symmetric else (128, 64, 16, 8)


def _launch_common(q, p, logit_scale, labels, row_groups, col_groups):
    if q.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError("the Triton path on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
                           "ville_kernels is imported (triton 3.9 reads it when @triton.jit runs)")
    # Strides are passed to the kernels, but a strided feature axis would make every load a gather.
    q = q if q.stride(1) == 1 else q.contiguous()
    p = p if p.stride(1) == 1 else p.contiguous()
    has_groups = row_groups is not None
    labels = labels.contiguous()
    row_groups = row_groups.contiguous() if has_groups else labels  # unread dummies when not has_groups
    col_groups = col_groups.contiguous() if has_groups else labels
    interpret = q.device.type == "cpu"
    interpret_bf16 = interpret and q.dtype == torch.bfloat16
    return dict(
        q=q, p=p, scale=logit_scale.detach().to(torch.float32).contiguous(), labels=labels,
        row_groups=row_groups, col_groups=col_groups, has_groups=has_groups, interpret=interpret,
        interpret_bf16=interpret_bf16,
        # fp32 inputs must not silently drop to tf32 in the dot; 16-bit dots accumulate in fp32 anyway.
        precision="ieee" if q.dtype == torch.float32 or interpret_bf16 else "tf32",
    )


@functools.lru_cache(maxsize=256)
def _forward_tiling(blocks_n: int, blocks_m: int, programs: int) -> tuple[int, int, float]:
    """(TILES_N, TILES_M, balance) for the persistent forward on `programs` resident programs.

    Super-tiles go round-robin to the programs, so the forward takes as long as its busiest program. One super-tile
    per program left the grid's tail idle (576 super-tiles for every N from 32k to 1M, 529 full, on 132 SMs: at
    most 0.82 of the machine). Candidates: 2 to 8 super-tiles per program, near-square (the scratch is
    O((N + M) * sqrt(super-tiles))); the first, i.e. the fewest super-tiles, whose balance = mean work / busiest
    program's work reaches _BALANCE, else the best seen. Work counts tiles, so ragged edge super-tiles weigh what
    they cost."""
    total = blocks_n * blocks_m
    best = None
    for per_program in range(2, 9):
        t = max(1, math.isqrt(total // max(1, per_program * programs)))
        for tn in range(max(1, t - 3), t + 4):
            for tm in range(max(1, t - 3), t + 4):
                tn_, tm_ = min(tn, blocks_n), min(tm, blocks_m)
                sn, sm = -(-blocks_n // tn_), -(-blocks_m // tm_)
                rows = torch.full((sn,), tn_, dtype=torch.int64)
                rows[-1] = blocks_n - tn_ * (sn - 1)
                cols = torch.full((sm,), tm_, dtype=torch.int64)
                cols[-1] = blocks_m - tm_ * (sm - 1)
                work = (rows[:, None] * cols[None, :]).flatten()
                padded = torch.zeros(-(-work.numel() // programs) * programs, dtype=torch.int64)
                padded[: work.numel()] = work
                balance = total / (min(programs, work.numel()) * padded.view(-1, programs).sum(0).max().item())
                if best is None or balance > best[2] + 1e-9 or (balance > best[2] - 1e-9 and sn * sm < best[3]):
                    best = (tn_, tm_, balance, sn * sm)
        if best[2] >= _BALANCE:
            break
    return best[:3]


_BALANCE = 0.95


def _infonce_fwd(q, p, logit_scale, labels, row_groups, col_groups, symmetric):
    """Triton forward: log-sum-exp over each row's negatives (N,) and each column's negatives (M,) or None, fp32,
    natural log. A row or column without negatives gets about -1e30."""
    a = _launch_common(q, p, logit_scale, labels, row_groups, col_groups)
    q, p = a["q"], a["p"]
    (N, D), M = q.shape, p.shape[0]
    block_n, block_m, block_d, num_warps = _block_sizes(q.dtype, a["interpret"], backward=False,
                                                            symmetric=symmetric)
    blocks_n, blocks_m = triton.cdiv(N, block_n), triton.cdiv(M, block_m)
    programs = _resident_programs(q.device)
    tiles_n, tiles_m, _ = _forward_tiling(blocks_n, blocks_m, programs)
    supers_n, supers_m = triton.cdiv(blocks_n, tiles_n), triton.cdiv(blocks_m, tiles_m)
    row_max = torch.empty(N, supers_m, dtype=torch.float32, device=q.device)
    row_sum = torch.empty(N, supers_m, dtype=torch.float32, device=q.device)
    if symmetric:
        col_max = torch.full((supers_n, M), _NEG, dtype=torch.float32, device=q.device)
        col_sum = torch.zeros(supers_n, M, dtype=torch.float32, device=q.device)
    else:
        col_max = col_sum = row_max  # unread
    _infonce_fwd_kernel[(min(programs, supers_n * supers_m),)](
        q, p, a["scale"], a["labels"], a["row_groups"], a["col_groups"], row_max, row_sum, col_max, col_sum,
        N, M, D, q.stride(0), q.stride(1), p.stride(0), p.stride(1),
        tiles_n, tiles_m, supers_m, supers_n * supers_m,
        HAS_GROUPS=a["has_groups"], SYMMETRIC=symmetric,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        DOT_PRECISION=a["precision"], INTERPRET_BF16=a["interpret_bf16"],
        num_warps=num_warps, num_stages=3, **_register_cap(a["interpret"]),
    )
    lse_row = _merge_log2_partials(row_max, row_sum, dim=1)
    lse_col = _merge_log2_partials(col_max, col_sum, dim=0) if symmetric else None
    return lse_row, lse_col


def _merge_log2_partials(maxes, sums, dim):
    """logsumexp (natural log) of partial (max, sum) pairs in log2 units along `dim`."""
    top = maxes.amax(dim=dim, keepdim=True)
    total = (sums * torch.exp2(maxes - top)).sum(dim=dim)
    return (top.squeeze(dim) + torch.log2(total)) * _LN2


def _grad_tile_scale(dtype: torch.dtype) -> float:
    """Power of two the backward's softmax tile is multiplied by before its cast to the input dtype: fp16's
    normal range starts at 6.1e-5, bf16's and fp32's at fp32's 1.2e-38 (see _infonce_bwd_kernel)."""
    return 2.0 ** 14 if dtype == torch.float16 else 1.0


def _infonce_bwd(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col, w_row, w_col,
                 symmetric):
    """Triton backward over the negative pairs. lse_* are full log-sum-exps (natural log), lse_col = +inf where a
    column has no positive. Returns fp32 dq (N, D), dp (M, D), ds (), and the negatives' softmax mass per row (N,)
    and per column (M,) or None. Provider: VILLE_INFONCE_BWD (`bwd_provider`), read at each call."""
    if bwd_provider() == "gemm":
        from .infonce_gemm import _infonce_bwd_gemm  # it imports this module's kernels and launch helpers

        return _infonce_bwd_gemm(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col, w_row,
                                 w_col, symmetric)
    return _infonce_bwd_atomic(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col, w_row,
                               w_col, symmetric)


_BWD_PROVIDERS = ("atomic", "gemm")


def bwd_provider() -> str:
    """The Triton backward's provider from VILLE_INFONCE_BWD: "atomic" (default) or "gemm" (module docstring)."""
    name = os.environ.get("VILLE_INFONCE_BWD", "") or "atomic"
    if name not in _BWD_PROVIDERS:
        raise ValueError(f"VILLE_INFONCE_BWD={name!r}: expected one of {', '.join(_BWD_PROVIDERS)}")
    return name


def _infonce_bwd_atomic(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col, w_row, w_col,
                        symmetric):
    """The one-pass atomic provider of `_infonce_bwd` (_infonce_bwd_kernel), same arguments and results."""
    a = _launch_common(q, p, logit_scale, labels, row_groups, col_groups)
    q, p = a["q"], a["p"]
    (N, D), M = q.shape, p.shape[0]
    block_n, block_m, block_d, num_warps = _block_sizes(q.dtype, a["interpret"], backward=True)
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    dq = torch.zeros(N, D, dtype=torch.float32, device=q.device)
    dp = torch.zeros(M, D, dtype=torch.float32, device=q.device)
    # One partial per row block (64 kB at N = 1M), not per program (512 MB at N = M = 1M).
    ds_part = torch.zeros(triton.cdiv(N, block_n), dtype=torch.float32, device=q.device)
    neg_row = torch.zeros(N, dtype=torch.float32, device=q.device)
    neg_col = torch.zeros(M, dtype=torch.float32, device=q.device) if symmetric else neg_row
    lse_row2 = (lse_row * _LOG2E).contiguous()
    lse_col2 = (lse_col * _LOG2E).contiguous() if symmetric else lse_row2
    _infonce_bwd_kernel[(programs,)](
        q, p, a["scale"], grad.detach().to(torch.float32).contiguous(), a["labels"], a["row_groups"],
        a["col_groups"], lse_row2, lse_col2, dq, dp, ds_part, neg_row, neg_col,
        N, M, D, q.stride(0), q.stride(1), p.stride(0), p.stride(1),
        w_row, w_col / w_row, _grad_tile_scale(q.dtype),
        HAS_GROUPS=a["has_groups"], SYMMETRIC=symmetric, GROUP_N=8,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        DOT_PRECISION=a["precision"], INTERPRET_BF16=a["interpret_bf16"],
        num_warps=num_warps, num_stages=2, **_register_cap(a["interpret"]),
    )
    return dq, dp, ds_part.sum(), neg_row, (neg_col if symmetric else None)


# ---- chunked PyTorch path (CPU default; also VILLE_KERNELS=torch on CUDA) -------------------------------------------
# Rows are processed CHUNK rows at a time so only a few (CHUNK, M) fp32 buffers exist at once. On CPU these passes
# are memory-bound, so the code counts them: the scale and the row LSE ride inside the GEMMs, and the column sums are
# one gemv over the row-normalised exponentials instead of a second (strided) logsumexp.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # per (CHUNK, M) fp32 buffer: 16 MB on CPU, 256 MB on a GPU
_TINY = 1.0e-30  # column sums below this may have lost terms to underflow in the gemv; recomputed exactly


def _chunk_rows(M: int, device: torch.device) -> int:
    return max(1, _CHUNK_ELEMENTS.get(device.type, 1 << 22) // M)


def _chunk_removed(row_groups_chunk, col_groups, labels_chunk, cols):
    """(CHUNK, len(cols)) bool: pairs left out of the denominators by groups (same group, not the positive)."""
    if row_groups_chunk is None:
        return None
    return (row_groups_chunk[:, None] == col_groups[cols][None, :]) & (cols[None, :] != labels_chunk[:, None])


def _chunk_negative_logits(q_scaled, p32, labels_chunk, row_groups_chunk, col_groups, cols):
    """Scaled logits of a row chunk against columns `cols`, with the positives and the group-removed pairs at -inf."""
    x = q_scaled @ p32[cols].T
    removed = _chunk_removed(row_groups_chunk, col_groups, labels_chunk, cols)
    if removed is not None:
        x.masked_fill_(removed, float("-inf"))
    x.masked_fill_(labels_chunk[:, None] == cols[None, :], float("-inf"))
    return x


def _infonce_fwd_torch(q, p, logit_scale, labels, row_groups, col_groups, symmetric):
    N, M = q.shape[0], p.shape[0]
    p32 = p.to(torch.float32)
    scale = logit_scale.detach().to(torch.float32)
    all_cols = torch.arange(M, device=q.device)
    lse_row = torch.empty(N, dtype=torch.float32, device=q.device)
    lse_col = torch.full((M,), float("-inf"), dtype=torch.float32, device=q.device) if symmetric else None
    step = _chunk_rows(M, q.device)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        labels_chunk = labels[lo:hi]
        groups_chunk = None if row_groups is None else row_groups[lo:hi]
        q_scaled = q[lo:hi].to(torch.float32) * scale
        e = q_scaled @ p32.T
        rows = torch.arange(hi - lo, device=q.device)
        removed = _chunk_removed(groups_chunk, col_groups, labels_chunk, all_cols)
        if removed is not None:
            e.masked_fill_(removed, float("-inf"))
        e[rows, labels_chunk] = float("-inf")  # negatives only: the positive is handled in closed form
        top = e.amax(dim=1)
        has_negative = torch.isfinite(top)
        top = torch.where(has_negative, top, torch.zeros_like(top))  # a row with no negative: all of e stays 0
        e.sub_(top[:, None]).exp_()
        lse_row[lo:hi] = top + torch.log(e.sum(dim=1))
        if symmetric:
            # sum_i exp(x_ij) = exp(c) * sum_i exp(top_i - c) * e_ij: one gemv, exact unless a column's sum is so
            # small that terms underflowed; those columns are recomputed from their logits.
            neg_inf = torch.full_like(top, float("-inf"))
            c = torch.where(has_negative, top, neg_inf).max()
            c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
            col_sum = torch.exp(torch.where(has_negative, top - c, neg_inf)) @ e
            chunk_lse = c + torch.log(col_sum)
            weak = (col_sum < _TINY).nonzero().squeeze(1)
            if weak.numel():
                x_weak = _chunk_negative_logits(q_scaled, p32, labels_chunk, groups_chunk, col_groups, weak)
                chunk_lse[weak] = torch.logsumexp(x_weak, dim=0)
            torch.logaddexp(lse_col, chunk_lse, out=lse_col)
    return lse_row, lse_col


def _infonce_bwd_torch(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col, w_row, w_col,
                       symmetric):
    """Chunked backward over the negative pairs; same contract as `_infonce_bwd`."""
    (N, D), M = q.shape, p.shape[0]
    p32 = p.to(torch.float32)
    scale = logit_scale.detach().to(torch.float32)
    # G is built as softmax_row + (w_col / w_row) * softmax_col and the common factor g * w_row is applied to the
    # (CHUNK, D) products instead of the (CHUNK, M) matrix.
    ratio = w_col / w_row
    factor = grad.detach().to(torch.float32) * w_row
    all_cols = torch.arange(M, device=q.device)
    ones_m = torch.ones(M, dtype=torch.float32, device=q.device)
    dq = torch.empty(N, D, dtype=torch.float32, device=q.device)
    dp = torch.zeros(M, D, dtype=torch.float32, device=q.device)
    ds = torch.zeros((), dtype=torch.float32, device=q.device)
    neg_row = torch.empty(N, dtype=torch.float32, device=q.device)
    neg_col = torch.zeros(M, dtype=torch.float32, device=q.device) if symmetric else None
    step = _chunk_rows(M, q.device)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        q32 = q[lo:hi].to(torch.float32)
        y = torch.addmm(-lse_row[lo:hi, None], q32 * scale, p32.T)  # x - lse_row in the GEMM's epilogue
        removed = _chunk_removed(None if row_groups is None else row_groups[lo:hi], col_groups, labels[lo:hi],
                                 all_cols)
        if removed is not None:
            y.masked_fill_(removed, float("-inf"))
        y[torch.arange(hi - lo, device=q.device), labels[lo:hi]] = float("-inf")  # positives: added by the caller
        g_chunk = y.exp() if symmetric else y.exp_()
        neg_row[lo:hi] = g_chunk @ ones_m
        if symmetric:
            # x - lse_col as y + (lse_row - lse_col): rounding at the size of these differences, not of the logits
            # (|x| ~ s) as adding lse_row back first would. lse_col = +inf (unlabelled column) gives exp(-inf) = 0.
            y.add_(lse_row[lo:hi, None] - lse_col[None, :]).exp_()
            neg_col += torch.ones(hi - lo, dtype=torch.float32, device=q.device) @ y
            g_chunk.add_(y, alpha=ratio)
        gp = g_chunk @ p32  # sum_j G_ij p_j, so ds = sum_ij G_ij q_i.p_j needs no (chunk, M) raw logits
        ds += (gp * q32).sum()
        dq[lo:hi] = gp.mul_(factor * scale)
        dp.addmm_(g_chunk.T, q32)
    return dq, dp.mul_(factor * scale), ds * factor, neg_row, neg_col


_POSITIVE_ROWS = 16384  # rows per step of the O(N * D) positive-pair work, so its fp32 copies stay small


def _positive_dots(q, p, labels):
    """(N,) fp32 q_i . p_labels[i] (unscaled), exact products of the inputs accumulated in fp32."""
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for lo in range(0, q.shape[0], _POSITIVE_ROWS):
        hi = min(q.shape[0], lo + _POSITIVE_ROWS)
        out[lo:hi] = (q[lo:hi].to(torch.float32) * p[labels[lo:hi]].to(torch.float32)).sum(dim=1)
    return out


def _add_positive_grads(q, p, logit_scale, grad, labels, w_row, w_col, neg_row, neg_col, dq, dp, ds, symmetric):
    """Add the positive pairs' gradients to fp32 dq / dp (in place); returns ds with theirs added. Shared by the
    Triton / chunked backward (InfoNCEFunction) and the custom op's CUDA backward (_infonce_bwd_cuda)."""
    share = w_row * neg_row
    if symmetric:
        share = share + w_col * neg_col[labels]
    g_pos = -grad.detach().to(torch.float32) * share
    scaled = g_pos * logit_scale.detach().to(torch.float32)
    for lo in range(0, q.shape[0], _POSITIVE_ROWS):
        hi = min(q.shape[0], lo + _POSITIVE_ROWS)
        q32, p_pos32 = q[lo:hi].to(torch.float32), p[labels[lo:hi]].to(torch.float32)
        dq[lo:hi] += p_pos32 * scaled[lo:hi, None]
        # index_put_ accumulates repeated labels (symmetric=False allows them); index_add_ is slow on CPU
        dp.index_put_((labels[lo:hi],), q32 * scaled[lo:hi, None], accumulate=True)
        ds = ds + (g_pos[lo:hi] * (q32 * p_pos32).sum(dim=1)).sum()
    return ds


def _loss_from_lse(q, p, logit_scale, labels, lse_neg_row, lse_neg_col, symmetric):
    """(loss, x_pos, z_row, z_col) from the negatives' log-sum-exps: the positive logits x_pos (N,) by an O(N * D)
    gather, z = lse_negatives - x_pos, loss = mean softplus(z) (both directions averaged when symmetric; z_col is
    None otherwise). Shared by InfoNCEFunction and the CUDA custom op."""
    x_pos = logit_scale.to(torch.float32) * _positive_dots(q, p, labels)
    z_row = lse_neg_row - x_pos
    loss = F.softplus(z_row).mean()
    z_col = None
    if symmetric:
        # Column labels[i] has row i as its positive (labels are distinct in symmetric mode).
        z_col = lse_neg_col[labels] - x_pos
        loss = 0.5 * (loss + F.softplus(z_col).mean())
    return loss, x_pos, z_row, z_col


def _grads_from_stats(bwd, q, p, logit_scale, grad, labels, row_groups, col_groups, x_pos, z_row, z_col, symmetric):
    """(dq, dp, dscale) in the inputs' dtypes from the forward's saved statistics, by the backward `bwd` (Triton
    launcher or chunked torch). Shared by InfoNCEFunction and the CUDA custom op."""
    N, M = q.shape[0], p.shape[0]
    w_row = 0.5 / N if symmetric else 1.0 / N
    w_col = 0.5 / N if symmetric else 0.0
    lse_row = x_pos + F.softplus(z_row)
    lse_col = None
    if symmetric:
        # Columns that are no row's label carry no loss: an LSE of +inf makes their softmax exactly 0.
        lse_col = torch.full((M,), float("inf"), dtype=torch.float32, device=q.device)
        lse_col[labels] = x_pos + F.softplus(z_col)
    dq, dp, ds, neg_row, neg_col = bwd(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row, lse_col,
                                       w_row, w_col, symmetric)
    # The positive pair (i, labels[i]) has G = softmax - 1 = -(softmax mass of the negatives), in both directions.
    # Taking that mass from exactly the probabilities the negatives used keeps every row and column of G summing to
    # zero (an independently rounded 1 - softmax does not, which biases dq, dp and ds), and adding it here, in fp32,
    # keeps it out of the tile's low-precision G.
    ds = _add_positive_grads(q, p, logit_scale, grad, labels, w_row, w_col, neg_row, neg_col, dq, dp, ds, symmetric)
    return dq.to(q.dtype), dp.to(p.dtype), ds.to(logit_scale.dtype)


class InfoNCEFunction(torch.autograd.Function):
    """Forward: log-sum-exp over each row's and each column's *negatives*, tiled (Triton) or chunked (torch), and the
    positive logits x_pos (N,) from an O(N * D) gather; with z = lse_negatives - x_pos the loss of a row (or column)
    is softplus(z), accurate even when the positive dominates. Backward recomputes the logits (module docstring)."""

    @staticmethod
    def forward(ctx, q, p, logit_scale, labels, row_groups, col_groups, symmetric):
        triton_path = use_triton(q, p)
        fwd = _infonce_fwd if triton_path else _infonce_fwd_torch
        # Autocast off: the torch path's matmuls must stay fp32 even inside a bf16 autocast region.
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            lse_neg_row, lse_neg_col = fwd(q, p, logit_scale, labels, row_groups, col_groups, symmetric)
            loss, x_pos, z_row, z_col = _loss_from_lse(q, p, logit_scale, labels, lse_neg_row, lse_neg_col, symmetric)
        ctx.save_for_backward(q, p, logit_scale, labels, row_groups, col_groups, x_pos, z_row, z_col)
        ctx.symmetric = symmetric
        ctx.triton_path = triton_path
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, p, logit_scale, labels, row_groups, col_groups, x_pos, z_row, z_col = ctx.saved_tensors
        bwd = _infonce_bwd if ctx.triton_path else _infonce_bwd_torch
        with torch.autocast(q.device.type, enabled=False):
            dq, dp, ds = _grads_from_stats(bwd, q, p, logit_scale, grad, labels, row_groups, col_groups, x_pos,
                                           z_row, z_col, ctx.symmetric)
        return dq, dp, ds, None, None, None, None


# ---- custom ops torch.ops.ville_kernels.infonce_fwd / infonce_bwd (CPU: csrc; CUDA: the launchers above) ------------
# Fake kernels and autograd let `torch.compile(fullgraph=True)` trace straight through the op.
@torch.library.register_fake("ville_kernels::infonce_fwd", lib=lib)
def _infonce_fwd_fake(q, p, logit_scale, labels, row_groups, col_groups, symmetric):
    N = q.shape[0]
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty((), **f32), q.new_empty((N,), **f32), q.new_empty((N,), **f32),
            q.new_empty((N if symmetric else 0,), **f32))


@torch.library.register_fake("ville_kernels::infonce_bwd", lib=lib)
def _infonce_bwd_fake(grad, q, p, logit_scale, labels, row_groups, col_groups, x_pos, z_row, z_col, symmetric):
    return torch.empty_like(q), torch.empty_like(p), torch.empty_like(logit_scale)


@torch.library.impl("ville_kernels::infonce_fwd", "CUDA", lib=lib)
def _infonce_fwd_cuda(q, p, logit_scale, labels, row_groups, col_groups, symmetric):
    """The Triton launchers above plus InfoNCEFunction.forward's closed-form positive pairs."""
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        lse_row, lse_col = _infonce_fwd(q, p, logit_scale, labels, row_groups, col_groups, symmetric)
        loss, x_pos, z_row, z_col = _loss_from_lse(q, p, logit_scale, labels, lse_row, lse_col, symmetric)
    return loss, x_pos, z_row, x_pos.new_empty((0,)) if z_col is None else z_col  # the schema returns a Tensor


@torch.library.impl("ville_kernels::infonce_bwd", "CUDA", lib=lib)
def _infonce_bwd_cuda(grad, q, p, logit_scale, labels, row_groups, col_groups, x_pos, z_row, z_col, symmetric):
    """InfoNCEFunction.backward on the Triton backward kernel, without the autograd.Function around it."""
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        return _grads_from_stats(_infonce_bwd, q, p, logit_scale, grad, labels, row_groups, col_groups, x_pos,
                                 z_row, z_col, symmetric)


def _infonce_setup_context(ctx, inputs, output):
    q, p, logit_scale, labels, row_groups, col_groups, symmetric = inputs
    _, x_pos, z_row, z_col = output
    ctx.mark_non_differentiable(x_pos, z_row, z_col)
    ctx.save_for_backward(q, p, logit_scale, labels, x_pos, z_row, z_col)
    # Optional tensors cannot go through save_for_backward as None; groups never need gradients.
    ctx.groups = (row_groups, col_groups)
    ctx.symmetric = symmetric


def _infonce_backward(ctx, grad_loss, _grad_x_pos, _grad_z_row, _grad_z_col):
    q, p, logit_scale, labels, x_pos, z_row, z_col = ctx.saved_tensors
    dq, dp, ds = torch.ops.ville_kernels.infonce_bwd(grad_loss, q, p, logit_scale, labels, *ctx.groups, x_pos, z_row,
                                                     z_col, ctx.symmetric)
    return dq, dp, ds, None, None, None, None


torch.library.register_autograd("ville_kernels::infonce_fwd", _infonce_backward,
                                setup_context=_infonce_setup_context, lib=lib)


def _infonce_op(q, p, logit_scale, labels=None, groups=None, symmetric=True):
    """`fused_infonce` through the custom op (same arguments and result). Eager calls validate with
    check_infonce_inputs (ValueError); under torch.compile the value checks that would need a host sync
    (label range, distinct labels) run inside the CPU kernel instead (RuntimeError)."""
    if torch.compiler.is_compiling():
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=q.device)
        labels = torch.arange(q.shape[0], device=q.device) if labels is None else labels.long()
        row_groups, col_groups = (None, None) if groups is None else (groups[0].long(), groups[1].long())
    else:
        logit_scale, labels, row_groups, col_groups = check_infonce_inputs(q, p, logit_scale, labels, groups,
                                                                           symmetric)
    loss, _, _, _ = torch.ops.ville_kernels.infonce_fwd(q, p, logit_scale, labels, row_groups, col_groups,
                                                        bool(symmetric))
    return loss


def fused_infonce(q, p, logit_scale, labels=None, groups=None, symmetric=True):
    """Contrastive InfoNCE (CLIP loss) without materialising the N x M logits; same results as `infonce_ref`.

    Args:
        q: (N, D) queries (rows), float16 / bfloat16 / float32, D <= 4096.
        p: (M, D) candidates (columns), same dtype and device as q.
        logit_scale: () the multiplier s, already exponentiated: logits = s * q @ p.T. Gets a gradient.
        labels: (N,) integer, row i's positive column in [0, M). None means arange(N) and needs M == N.
            In symmetric mode labels must be distinct.
        groups: optional (row_groups (N,), col_groups (M,)) integer ids. A pair (i, j) with
            row_groups[i] == col_groups[j] that is not row i's positive is left out of both denominators
            (several captions of one video in a batch are not each other's negatives).
        symmetric: True gives 0.5 * (row loss + column loss), False the row (q -> p) loss only.
    Returns:
        () float32 loss, mean reduction: row loss = mean over N rows of CE(s * q_i . p^T, labels[i]); column loss =
        mean over the N labelled columns j = labels[i] of CE over the N rows of s * q . p_j with row i positive
        (unlabelled columns contribute nothing). Gradients reach q, p (in their dtype) and logit_scale.

    Legend: N rows, M columns, D features. Accumulation and log-sum-exp are fp32. Dispatch: CUDA -> Triton kernels,
    CPU -> the native csrc kernels when built (the custom op above; kernels/ville_kernels/native.py loads them), else
    chunked PyTorch (O(chunk * M) memory), TRITON_INTERPRET=1 -> the Triton kernels on CPU (set before import),
    VILLE_KERNELS=torch -> chunked PyTorch everywhere. Raises ValueError on malformed inputs.
    """
    if use_csrc(q, p):  # the native CPU kernels as a custom op (torch.compile traces through it)
        return _infonce_op(q, p, logit_scale, labels, groups, symmetric)
    logit_scale, labels, row_groups, col_groups = check_infonce_inputs(q, p, logit_scale, labels, groups, symmetric)
    return InfoNCEFunction.apply(q, p, logit_scale, labels, row_groups, col_groups, bool(symmetric))
