"""One-token decode attention over per-sample KV caches, with `batch_idx` compaction (flash-decoding).

Shape letters (kernels, launchers, reference):
    B        active queries (one new token each)          Bc       rows of the preallocated cache (B_cache)
    Hq       query heads                                  Hkv      key/value heads (Hq % Hkv == 0)
    G        query heads per kv head, Hq // Hkv           Lm       cache capacity in positions (L_max)
    D        head dim (Dh, <= 256)                        S        key-length splits (flash-decoding)
    BLOCK_G  G padded to a tl.dot-able power of two      BLOCK_N  keys per tile      BLOCK_D  D padded to pow2

Reading order: Triton kernels, launchers (grid, block sizes, split heuristic), the CPU torch path, the fp64
reference, the input checks, the custom op `torch.ops.ville_kernels.decode_attention` (fake and CUDA kernels,
wrapper; schema in library.py, CPU kernel in csrc/decode_attention.cpp), then the public `decode_attention`.
"""
from __future__ import annotations

import torch

from .dispatch import sm_count, use_csrc, use_triton
from .library import lib

try:
    import triton
    import triton.language as tl
except Exception:  # triton is Linux-only; the torch path and the reference work without it
    triton = None

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256

if triton is not None:

    @triton.jit
    def _decode_attention_fwd_kernel(
        Q, K, V, CACHE_LENS, BATCH_IDX, O, O_PART, LSE_PART,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd,
        stride_ob, stride_oh, stride_od,
        Hq, scale, softcap, window,
        G: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_BATCH_IDX: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    ):
        """Program (b, kv head, split): online softmax of the G query heads of one kv head group over one split of
        the visible key span. NUM_SPLITS == 1 writes the output directly; otherwise it writes the normalised partial
        output (fp32) and its log2-sum-exp for the combine kernel.

        INTERPRET_BF16: triton 3.9's interpreter multiplies bf16 dot operands as raw uint16 bit patterns, so under
        TRITON_INTERPRET bf16 tiles are widened to fp32 first (bf16 x bf16 products are exact in fp32, so this is
        the same arithmetic as the GPU's bf16 MMA with fp32 accumulation)."""
        pid_b = tl.program_id(0)
        pid_kvh = tl.program_id(1)
        pid_s = tl.program_id(2)

        if HAS_BATCH_IDX:
            row = tl.load(BATCH_IDX + pid_b).to(tl.int64)
        else:
            row = pid_b.to(tl.int64)
        # cache_lens counts the valid positions of a cache row, the current token included.
        n_end = tl.load(CACHE_LENS + row).to(tl.int32)
        n_start = n_end * 0
        if HAS_WINDOW:
            n_start = tl.maximum(n_end - window, 0)
        # Split this sample's own visible span (not Lm) evenly, in whole tiles, so short samples finish early and
        # every split of a long one does the same work; trailing splits of a short span are empty.
        split_len = tl.cdiv(tl.cdiv(n_end - n_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = n_start + pid_s * split_len
        hi = tl.minimum(lo + split_len, n_end)

        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < G
        mask_d = offs_d < D
        heads = pid_kvh * G + offs_g

        q_ptrs = Q + pid_b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        if INTERPRET_BF16:
            q = q.to(tl.float32)
        k_base = K + row * stride_kb + pid_kvh.to(tl.int64) * stride_kh
        v_base = V + row * stride_vb + pid_kvh.to(tl.int64) * stride_vh

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs = start + offs_n
            mask_n = offs < hi
            # Masked loads never touch positions outside [lo, hi): cache garbage (even NaN) cannot leak in.
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            if INTERPRET_BF16:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            if HAS_SOFTCAP:
                # softcap * tanh(s / softcap); tanh via exp2 of -2|x| so it cannot overflow (tl has no tanh).
                x = s / softcap
                e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
                t = (1.0 - e) / (1.0 + e)
                s = softcap * tl.where(x < 0, -t, t)
            s = s * 1.4426950408889634  # log2(e): work in log2 units, exp2 is the native instruction
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            p = p.to(V.dtype.element_ty)  # round p to the cache dtype, as the tensor-core dot wants
            if INTERPRET_BF16:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new

        # An empty split (l_i == 0) stores out 0 and lse -inf, which the combine weighs by exp2(-inf) = 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if NUM_SPLITS == 1:
            o_ptrs = O + pid_b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
        else:
            part = (pid_b.to(tl.int64) * Hq + heads) * NUM_SPLITS + pid_s  # O_PART (B, Hq, S, D), LSE_PART (B, Hq, S)
            tl.store(O_PART + part[:, None] * D + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(LSE_PART + part, lse, mask=mask_g)

    @triton.jit
    def _decode_attention_combine_kernel(
        O_PART, LSE_PART, O,
        stride_ob, stride_oh, stride_od,
        Hq,
        D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (b, query head): log-sum-exp merge of the S partial outputs, out = sum_s w_s o_s / sum_s w_s with
        w_s = 2^(lse_s - max lse)."""
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < NUM_SPLITS
        mask_d = offs_d < D
        base = (pid_b.to(tl.int64) * Hq + pid_h) * NUM_SPLITS
        lse = tl.load(LSE_PART + base + offs_s, mask=mask_s, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is never empty for cache_len >= 1, so the max is finite
        o = tl.load(O_PART + (base + offs_s[:, None]) * D + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
        o_ptrs = O + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh + offs_d * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_d)


def _kernels_interpreted() -> bool:
    """Whether triton decorated our kernels for its interpreter (TRITON_INTERPRET=1 at import) or for the GPU."""
    return triton is not None and not isinstance(_decode_attention_fwd_kernel, triton.runtime.jit.JITFunction)


_MAX_SPLITS = 64
_CPU_INTERPRET_SMS = 4  # a pretend SM count under TRITON_INTERPRET so small test shapes still exercise the splits


def _num_sms(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else _CPU_INTERPRET_SMS


def _block_g(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


# Registers per thread (ptxas' .maxnreg): uncapped, ptxas took 255 at head dim 128 (no headroom); every variant
# compiles under 232 without spills for sm_90 and sm_80 with the tiles of _block_sizes (ville_kernels.compile_report).
_MAX_REGISTERS = 232


def _block_sizes(head_dim: int, interpret: bool, dtype: torch.dtype = torch.bfloat16,
                 group: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps). Under the interpreter each tile costs Python time, not registers; 16-key tiles
    keep tiny test caches spanning several tiles and splits."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret:
        return 16, block_d, 1
    # Decode is bandwidth-bound: 8 KiB of bf16 keys per tile (64 x 64, 32 x 128) per stage keeps loads in flight; at
    # D = 256 double the warps to stay within registers for the (BLOCK_G, 256) fp32 accumulator. fp32 caches take
    # 16-key tiles (their ieee dot runs on FMAs and spilled at 32), and 32+ query heads per kv head (BLOCK_G >= 32)
    # halve the tile. Each of these is the largest that compiled without spills for sm_90 and sm_80.
    block_n, num_warps = {64: (64, 4), 128: (32, 4)}.get(max(block_d, 64), (32, 8))
    if dtype == torch.float32:
        block_n = 16
        if _block_g(group) >= 32:
            num_warps = 8  # with 4 the (32, D) fp32 accumulator and scores spilled up to 336 bytes
    elif _block_g(group) >= 32:
        block_n //= 2
    return block_n, block_d, num_warps


def _num_stages(head_dim: int, dtype: torch.dtype, group: int) -> int:
    """Software-pipelining depth: 2, except fp32 caches at D = 256 with 32+ query heads per kv head, where the second
    stage's registers spilled (126 registers with 1 stage, spills with 2 or 3)."""
    return 1 if dtype == torch.float32 and head_dim > 128 and _block_g(group) >= 32 else 2


def _num_splits(batch: int, kv_heads: int, span: int, block_n: int, num_sms: int) -> int:
    """Flash-decoding split count from the launch shape alone (no host sync on cache_lens).

    B * Hkv programs already fill the GPU when they cover the SMs about four times over (large batch: S = 1, no
    combine pass). Otherwise split the key span until ~4 programs per SM are in flight, but never below two tiles
    per split (a split must amortise its q load and partial-output write) and never above _MAX_SPLITS. `span` is the
    longest possible visible span: min(Lm, window)."""
    want = triton.cdiv(4 * num_sms, max(1, batch * kv_heads))
    by_length = triton.cdiv(span, 2 * block_n)
    return max(1, min(want, by_length, _MAX_SPLITS))


def _decode_attention_fwd(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window,
                          num_splits=None, block_n=None):
    """Launch the split kernel (grid (B, Hkv, S)) and, when S > 1, the combine kernel (grid (B, Hq)).

    Any strides are accepted (Triton specialises unit strides, so a contiguous last dim gets vector loads); nothing
    here copies a cache. `num_splits` / `block_n` override the heuristics (tests use them to force edge cases)."""
    B, Hq, D = q.shape
    _, Hkv, Lm, _ = k_cache.shape
    G = Hq // Hkv
    interpret = q.device.type == "cpu"
    bn, block_d, num_warps = _block_sizes(D, interpret, q.dtype, G)
    block_n = block_n or bn
    span = min(Lm, window) if window is not None else Lm
    if num_splits is None:
        num_splits = _num_splits(B, Hkv, span, block_n, _num_sms(q.device))
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_splits > 1:
        o_part = torch.empty((B, Hq, num_splits, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused: the kernel writes `out` directly
    interpret_bf16 = interpret and q.dtype == torch.bfloat16
    _decode_attention_fwd_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, cache_lens, batch_idx if batch_idx is not None else cache_lens, out, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        Hq, scale, softcap if softcap is not None else 1.0, window if window is not None else 0,
        G=G, D=D, NUM_SPLITS=num_splits,
        BLOCK_G=_block_g(G), BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_BATCH_IDX=batch_idx is not None, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        # fp32 caches must not silently drop to tf32 in the dot; bf16/fp16 dots accumulate in fp32 anyway.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interpret_bf16 else "tf32",
        INTERPRET_BF16=interpret_bf16,
        num_warps=num_warps, num_stages=_num_stages(D, q.dtype, G),
        **({} if interpret else {"maxnreg": _MAX_REGISTERS}),
    )
    if num_splits > 1:
        _decode_attention_combine_kernel[(B, Hq)](
            o_part, lse_part, out, *out.stride(), Hq,
            D=D, NUM_SPLITS=num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
            num_warps=4 if block_d >= 128 else 1,
        )
    return out


def _decode_attention_torch(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window):
    """CPU path (also VILLE_KERNELS=torch on CUDA, and whenever autograd needs gradients): fp32 grouped-query
    matmuls over the visible columns of all rows at once.

    Why this shape of code (measured on a 2-core CPU, fp32, B 16, L 1k, Dh 256): SDPA with a boolean mask was 2x
    slower and needs both K and V scrubbed of garbage; (B, Hkv, L, D) @ (D, G) runs ~3x faster than
    (G, D) @ (D, L) in oneDNN; and copying V to zero its hidden rows cost more than everything else (fresh pages),
    so that copy happens only when V actually holds non-finite values (p is exactly 0 on hidden positions, and
    0 * finite = 0; a finite sum of V proves there is no NaN/inf). On CPU the columns are trimmed to the used range
    and a batch_idx that is not the identity goes to _decode_attention_torch_rows; on CUDA we skip those
    host-synchronising steps and gather rows."""
    B, Hq, D = q.shape
    Bc, Hkv, Lm, _ = k_cache.shape
    G = Hq // Hkv
    on_cpu = q.device.type == "cpu"
    rows = batch_idx.long() if batch_idx is not None else None
    lens = (cache_lens[rows] if rows is not None else cache_lens).long()
    starts = (lens - window).clamp_min(0) if window is not None else torch.zeros_like(lens)
    lo, hi = 0, Lm
    if on_cpu:
        if rows is not None and not (B == Bc and torch.equal(rows, torch.arange(Bc))):
            return _decode_attention_torch_rows(q, k_cache, v_cache, rows, starts, lens, scale, softcap)
        rows = None
        lo, hi = int(starts.min()), int(lens.max())
    k = k_cache[:, :, lo:hi]
    v = v_cache[:, :, lo:hi]
    if rows is not None:
        k, v = k.index_select(0, rows), v.index_select(0, rows)
    pos = torch.arange(lo, hi, device=q.device)
    visible = (pos[None, :] < lens[:, None]) & (pos[None, :] >= starts[:, None])  # (B, L)
    all_visible = on_cpu and bool(visible.all())

    s = torch.matmul(k.float(), q.float().reshape(B, Hkv, G, D).transpose(-1, -2)) * scale  # (B, Hkv, L, G)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if not all_visible:
        s = s.masked_fill(~visible[:, None, :, None], float("-inf"))  # also drops NaN scores of garbage keys
    p = torch.softmax(s, dim=-2)
    v = v.float()
    if not all_visible and not (on_cpu and bool(torch.isfinite(v.sum()))):
        v = v.masked_fill(~visible[:, None, :, None], 0.0)
    return torch.matmul(p.transpose(-1, -2), v).reshape(B, Hq, D).to(q.dtype)


def _decode_attention_torch_rows(q, k_cache, v_cache, rows, starts, lens, scale, softcap):
    """CPU, batch_idx not the identity: one sample at a time on views of its own visible positions. Gathering the
    active rows into a batch costs a fresh copy of their caches (slower than the attention itself); views need no
    copy, no mask and no garbage scrub, so the cost follows the active rows and their own lengths."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)
    outs = []
    for b, (row, lo, hi) in enumerate(zip(rows.tolist(), starts.tolist(), lens.tolist())):
        s = torch.matmul(k_cache[row, :, lo:hi].float(), qf[b].transpose(-1, -2)) * scale  # (Hkv, n, G)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s, dim=-2)
        outs.append(torch.matmul(p.transpose(-1, -2), v_cache[row, :, lo:hi].float()))  # (Hkv, G, D)
    return torch.stack(outs).reshape(B, Hq, D).to(q.dtype)


def decode_attention_ref(q, k_cache, v_cache, cache_lens, batch_idx=None, scale=None, softcap=None, window=None,
                         upcast=True):
    """The specification: materialised masked attention over gathered cache rows, in float64 when `upcast`
    (otherwise in the input dtype, which is what the tests' error budget and the benchmark's naive provider use).
    Returns (B, Hq, D) in the compute dtype (float64 when `upcast`, so comparisons see the unrounded answer).
    Shapes and arguments as in `decode_attention`."""
    B, Hq, D = q.shape
    Bc, Hkv, Lm, _ = k_cache.shape
    G = Hq // Hkv
    dtype = torch.float64 if upcast else q.dtype
    scale = D ** -0.5 if scale is None else scale
    rows = torch.arange(B, device=q.device) if batch_idx is None else batch_idx.long()
    k = k_cache[rows].to(dtype)  # (B, Hkv, Lm, D)
    v = v_cache[rows].to(dtype)
    lens = cache_lens[rows].long()
    pos = torch.arange(Lm, device=q.device)
    visible = pos[None, :] < lens[:, None]
    if window is not None:
        visible &= pos[None, :] >= lens[:, None] - window
    # Query head h = kv_head * G + g reads kv head h // G.
    s = torch.matmul(q.to(dtype).reshape(B, Hkv, G, D), k.transpose(-1, -2)) * scale  # (B, Hkv, G, Lm)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    v = v.masked_fill(~visible[:, None, :, None], 0.0)  # hidden positions may hold NaN garbage; 0 * NaN = NaN
    return torch.matmul(p, v).view(B, Hq, D)


def _check(q, k_cache, v_cache, cache_lens, batch_idx, softcap, window, check):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("decode_attention expects q (B, Hq, Dh) and k_cache/v_cache (B_cache, Hkv, L_max, Dh), "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    Bc, Hkv, Lm, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if Dk != D:
        raise ValueError(f"q head dim {D} != cache head dim {Dk}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {_MAX_HEAD_DIM}], got {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one dtype among {_SUPPORTED_DTYPES}, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    int_dtypes = (torch.int32, torch.int64)
    if cache_lens.shape != (Bc,) or cache_lens.dtype not in int_dtypes:
        raise ValueError(f"cache_lens must be int32/int64 of shape (B_cache,) = ({Bc},), "
                         f"got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    if batch_idx is None:
        if B != Bc:
            raise ValueError(f"without batch_idx, q's batch {B} must equal the cache's rows {Bc}")
    elif batch_idx.shape != (B,) or batch_idx.dtype not in int_dtypes:
        raise ValueError(f"batch_idx must be int32/int64 of shape (B,) = ({B},), "
                         f"got {batch_idx.dtype} {tuple(batch_idx.shape)}")
    tensors = [q, k_cache, v_cache, cache_lens] + ([batch_idx] if batch_idx is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be an int >= 1 or None, got {window}")
    # Value checks read tensor contents: free on CPU, a host sync on CUDA, so there only with check=True.
    if (q.device.type == "cpu" or check) and B > 0:
        rows = batch_idx.long() if batch_idx is not None else torch.arange(B, device=q.device)
        bad = (rows < 0) | (rows >= Bc)
        if bool(bad.any()):
            raise ValueError(f"batch_idx must lie in [0, B_cache={Bc}), got {rows[bad].tolist()[:8]}")
        lens = cache_lens[rows]
        bad = (lens < 1) | (lens > Lm)
        if bool(bad.any()):
            raise ValueError(f"cache_lens of used rows must lie in [1, L_max={Lm}], got {lens[bad].tolist()[:8]} "
                             f"at rows {rows[bad].tolist()[:8]}")


# ---- custom op torch.ops.ville_kernels.decode_attention (CPU: csrc; CUDA: the launcher above) -----------------------
# The fake kernel lets `torch.compile(fullgraph=True)` trace straight through the op (forward only: no autograd).
@torch.library.register_fake("ville_kernels::decode_attention", lib=lib)
def _decode_attention_fake(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.impl("ville_kernels::decode_attention", "CUDA", lib=lib)
def _decode_attention_cuda(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window):
    return _decode_attention_fwd(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window)


def _decode_attention_op(q, k_cache, v_cache, cache_lens, batch_idx=None, scale=None, softcap=None, window=None,
                         check=False):
    """`decode_attention` through the custom op (forward only; same arguments and result). Eager calls validate
    with decode_attention's checks (ValueError); under torch.compile the CPU kernel checks values."""
    if not torch.compiler.is_compiling():
        _check(q, k_cache, v_cache, cache_lens, batch_idx, softcap, window, check)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap) if softcap is not None else None
    window = int(window) if window is not None else None
    return torch.ops.ville_kernels.decode_attention(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window)


def decode_attention(q, k_cache, v_cache, cache_lens, batch_idx=None, scale=None, softcap=None, window=None,
                     check=False):
    """Attention of one new token per active sample over its own KV-cache row.

    Args:
        q:          (B, Hq, D) the new token's queries, one row per *active* sample.
        k_cache:    (Bc, Hkv, Lm, D) preallocated key cache; any strides (a unit last stride is fastest).
        v_cache:    (Bc, Hkv, Lm, D) value cache, same shape and dtype.
        cache_lens: (Bc,) int32/int64, indexed by *cache row*: the number of valid positions of that row, the current
                    token included (the caller writes the new k/v at position cache_lens[row] - 1 first).
                    Positions >= cache_lens[row] may hold anything (NaN included): they never reach the output
                    (the Triton kernel does not even load them).
        batch_idx:  (B,) int32/int64 or None; query b reads cache row batch_idx[b] (any order, any subset, so finished
                    samples drop out without copying caches). None means arange(B) and needs B == Bc.
        scale:      score scale, default D ** -0.5.
        softcap:    Gemma-2 logit soft-capping, scores = softcap * tanh(scale * q.k / softcap); None disables.
        window:     sliding window: only positions >= cache_lens[row] - window are visible; None = all.
        check:      on CUDA, also validate batch_idx range and 1 <= cache_lens[row] <= Lm (a host sync). On CPU
                    these value checks always run.

    Returns (B, Hq, D) in q's dtype, accumulated in fp32. Query head h uses kv head h // (Hq // Hkv).
    Gradients: the Triton kernels are forward-only; if autograd needs a gradient the torch path runs (differentiable
    wherever the cache holds finite values).
    Legend: B active queries, Bc cache rows, Hq/Hkv query/kv heads, Lm cache capacity, D head dim (<= 256).

    Dispatch (dispatch.use_triton / use_csrc): CUDA -> Triton flash-decoding kernels; CPU -> the native kernel
    (csrc, when built; forward only) or fp32 torch matmuls, or the Triton
    kernels through the interpreter when TRITON_INTERPRET=1 was set before triton was first imported (triton 3.9
    reads it at import and when decorating kernels); VILLE_KERNELS=torch forces the torch path.
    Raises ValueError on bad ranks, Hq % Hkv != 0, dtype/device mismatch, bad batch_idx / cache_lens values.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    # csrc is forward-only too, and takes no empty batch (the torch path returns it).
    if not needs_grad and q.shape[0] > 0 and use_csrc(q, k_cache, v_cache, cache_lens):
        return _decode_attention_op(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window, check)
    _check(q, k_cache, v_cache, cache_lens, batch_idx, softcap, window, check)
    # The Triton kernels are forward-only; when autograd needs gradients the differentiable torch path runs instead.
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap) if softcap is not None else None
    window = int(window) if window is not None else None
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    tensors = [t for t in (q, k_cache, v_cache, cache_lens, batch_idx) if t is not None]
    if triton is not None and not needs_grad and use_triton(*tensors):
        if q.device.type == "cpu" and not _kernels_interpreted():
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; triton reads it at import and "
                               "when decorating kernels, so set it before importing triton or ville_kernels")
        return _decode_attention_fwd(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window)
    return _decode_attention_torch(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window)
