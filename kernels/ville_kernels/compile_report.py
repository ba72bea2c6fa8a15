"""Compile every kernel variant the launchers can choose for an NVIDIA target, without a GPU, and report resources.

`triton.compile` runs the whole code generation (ptxas ships with Triton) for a named target, so registers, spills
and shared memory per variant are known on any machine: the CI test (tests/kernels/test_kernel_compile.py) fails on
register spills, shared memory over the target's per-block limit, or more than MAX_REGS registers, and prints this
table. `python -m ville_kernels.compile_report [--arch 90 80] [--all]` prints it by hand.

A variant is one set of constexprs a launcher can pass: dtype x every optional code path (InfoNCE: HAS_GROUPS,
SYMMETRIC; decode attention: GQA group size, head dim, softcap, batch_idx, window, split-K and its combine kernel),
with the launchers' own block sizes and warps (`_block_sizes`). Arguments are specialised as the runtime launcher
specialises contiguous torch tensors: unit feature strides become the constant 1, pointers are 16-byte aligned.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import torch

# import_module: the package re-exports functions named like these submodules.
da = importlib.import_module(__package__ + ".decode_attention")
nce = importlib.import_module(__package__ + ".infonce")
nce_gemm = importlib.import_module(__package__ + ".infonce_gemm")

MAX_REGS = 240  # of 255: headroom so that a small code change cannot push a variant into spills
# Per-SM limits (CUDA programming guide, "compute capabilities" table): shared memory per SM and per block, the
# 1 KB the driver reserves per block, registers, resident threads and blocks.
TARGETS = {
    90: dict(smem_sm=228 * 1024, smem_block=227 * 1024, regs=65536, threads=2048, ctas=32),
    80: dict(smem_sm=164 * 1024, smem_block=163 * 1024, regs=65536, threads=2048, ctas=32),
}
_SMEM_RESERVED = 1024
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_UNIT_STRIDES = {"stride_qd", "stride_pd", "stride_kd", "stride_vd", "stride_od"}
_INTS = {"N", "M", "D", "TILES_N", "TILES_M", "SUPERS_M", "SUPERS", "Hq", "window", "ROW0", "ROWS"}
_FLOATS = {"scale", "softcap", "w_row", "col_ratio", "tile_scale"}


@dataclass(frozen=True)
class Variant:
    kernel: str  # short name, e.g. "infonce_fwd"
    key: str  # readable id of the constexprs, e.g. "bf16-sym-groups"
    fn: object = field(repr=False, compare=False)
    pointers: dict = field(repr=False, compare=False)  # argument name -> triton pointer type
    constexprs: dict = field(repr=False, compare=False)
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None  # the launcher's register cap, if it sets one


@dataclass
class Report:
    variant: Variant
    arch: int
    regs: int
    spills: int
    smem: int
    ctas_per_sm: int
    seconds: float

    def problems(self) -> list[str]:
        out = []
        if self.spills:
            out.append(f"{self.spills} bytes of register spills")
        if self.ctas_per_sm < 1:
            out.append(f"no block fits an SM ({self.regs} registers x {self.variant.num_warps} warps)")
        if self.regs > MAX_REGS:
            out.append(f"{self.regs} registers > {MAX_REGS}")
        if self.smem > TARGETS[self.arch]["smem_block"]:
            limit = TARGETS[self.arch]["smem_block"]
            out.append(f"{self.smem} B shared memory > the sm_{self.arch} block limit {limit}")
        return out


def _infonce_variants(everything: bool) -> list[Variant]:
    out = []
    for dtype, backward, has_groups, symmetric in itertools.product(_TRITON_DTYPES, (False, True), (False, True),
                                                                      (False, True)):
        if not everything and (has_groups != symmetric or dtype == torch.float16):
            continue
        block_n, block_m, block_d, num_warps = nce._block_sizes(dtype, False, backward, symmetric)
        t = _TRITON_DTYPES[dtype]
        constexprs = dict(HAS_GROUPS=has_groups, SYMMETRIC=symmetric, BLOCK_N=block_n, BLOCK_M=block_m,
                          BLOCK_D=block_d, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                          INTERPRET_BF16=False)
        if backward:
            constexprs["GROUP_N"] = 8
        key = f"{t}-{'sym' if symmetric else 'row'}{'-groups' if has_groups else ''}"
        out.append(Variant("infonce_bwd" if backward else "infonce_fwd", key,
                           nce._infonce_bwd_kernel if backward else nce._infonce_fwd_kernel,
                           {"Q": f"*{t}", "P": f"*{t}", "LABELS": "*i64", "ROW_GROUPS": "*i64", "COL_GROUPS": "*i64"},
                           constexprs, num_warps, 2 if backward else 3, nce._MAX_REGISTERS))
    return out


def _infonce_gemm_variants(everything: bool) -> list[Variant]:
    """The gemm backward provider's recompute kernel (infonce_gemm.py): G is stored in the input dtype."""
    out = []
    for dtype, has_groups, symmetric in itertools.product(_TRITON_DTYPES, (False, True), (False, True)):
        if not everything and (has_groups != symmetric or dtype == torch.float16):
            continue
        block_n, block_m, block_d, num_warps = nce_gemm._gemm_block_sizes(dtype, False)
        t = _TRITON_DTYPES[dtype]
        constexprs = dict(HAS_GROUPS=has_groups, SYMMETRIC=symmetric, GROUP_N=8, BLOCK_N=block_n, BLOCK_M=block_m,
                          BLOCK_D=block_d, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                          INTERPRET_BF16=False)
        key = f"{t}-{'sym' if symmetric else 'row'}{'-groups' if has_groups else ''}"
        out.append(Variant("infonce_gemm_g", key, nce_gemm._infonce_grad_chunk_kernel,
                           {"Q": f"*{t}", "P": f"*{t}", "G": f"*{t}", "LABELS": "*i64", "ROW_GROUPS": "*i64",
                            "COL_GROUPS": "*i64"}, constexprs, num_warps, 3, nce._MAX_REGISTERS))
    return out


def _decode_variants(everything: bool) -> list[Variant]:
    out = []
    # G: 1 (MHA), 2 (Gemma-2-2B), 8 (Llama-3-70B), 32 (MQA with 32 heads: BLOCK_G 32). Splits: 1 writes the output
    # directly, 8 writes partials for the combine kernel.
    flags = list(itertools.product((1, 2, 8, 32), (False, True), (False, True), (False, True), (1, 8)))
    for dtype, head_dim in itertools.product(_TRITON_DTYPES, (64, 128, 256)):
        if not everything and dtype == torch.float16:
            continue
        t = _TRITON_DTYPES[dtype]
        for G, softcap, batch_idx, window, splits in flags:
            block_n, block_d, num_warps = da._block_sizes(head_dim, False, dtype, G)
            all_on, all_off = softcap and batch_idx and window and splits > 1, not (softcap or batch_idx or window
                                                                                        or splits > 1)
            if not everything and not (G in (1, 32) and (all_on or all_off)):
                continue  # default set: the smallest and largest head group, every optional path on or none
            constexprs = dict(G=G, D=head_dim, NUM_SPLITS=splits, BLOCK_G=da._block_g(G),
                              BLOCK_N=block_n, BLOCK_D=block_d, HAS_BATCH_IDX=batch_idx, HAS_SOFTCAP=softcap,
                              HAS_WINDOW=window, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                              INTERPRET_BF16=False)
            key = (f"{t}-d{head_dim}-g{G}-s{splits}" + ("-softcap" if softcap else "") + ("-idx" if batch_idx else "")
                   + ("-window" if window else ""))
            out.append(Variant("decode_fwd", key, da._decode_attention_fwd_kernel,
                               {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": f"*{t}", "CACHE_LENS": "*i64",
                                "BATCH_IDX": "*i64"}, constexprs, num_warps, da._num_stages(head_dim, dtype, G),
                               da._MAX_REGISTERS))
        for splits in (2, 64) if everything else (64,):  # BLOCK_S 2 and the largest, _MAX_SPLITS
            out.append(Variant("decode_combine", f"{t}-d{head_dim}-s{splits}", da._decode_attention_combine_kernel,
                               {"O": f"*{t}"}, dict(D=head_dim, NUM_SPLITS=splits,
                                                     BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
                                                     BLOCK_D=block_d), 4 if block_d >= 128 else 1, 3))
    return out


def variants(everything: bool = False) -> list[Variant]:
    """The default set keeps, per dtype and shape choice, the variant with every optional code path on and the one
    with none (where registers peak and where they are fewest), decode at GQA groups 1 and 32 (BLOCK_G 16 and 32),
    the combine kernel at its largest split count, fp32 and bf16 (fp16 compiles to the same registers as bf16: the
    full table); `everything` adds fp16, each flag combination, groups 2 and 8, and the 2-split combine."""
    return _infonce_variants(everything) + _infonce_gemm_variants(everything) + _decode_variants(everything)


def _signature(variant: Variant):
    import triton  # noqa: F401

    signature, constexprs, attrs = {}, dict(variant.constexprs), {}
    fn = variant.fn
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name in _INTS or name.startswith("stride_"):
            signature[name] = "i32"
        else:  # pointers: the dtype-specific ones, else fp32 scratch
            signature[name] = variant.pointers.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_variant(variant: Variant, arch: int) -> Report:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(variant)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=variant.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages,
                                       "maxnreg": variant.maxnreg})
    seconds = time.perf_counter() - start
    # Registers and local memory are known to the driver only after loading (CompiledKernel.n_regs needs a GPU);
    # cuobjdump (shipped with Triton) reads them from the cubin.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    res = dict((k, int(v)) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    smem = int(compiled.metadata.shared) + res["SHARED"]  # Triton's dynamic allocation + the cubin's static one
    spills = res["LOCAL"] + res["STACK"]
    return Report(variant, arch, res["REG"], spills, smem, ctas_per_sm(arch, res["REG"], smem, variant.num_warps),
                  seconds)


def ctas_per_sm(arch: int, regs: int, smem: int, num_warps: int) -> int:
    """Resident blocks per SM by registers (allocated per warp in units of 256), shared memory and threads."""
    lim = TARGETS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // per_warp) // num_warps
    by_smem = lim["smem_sm"] // (smem + _SMEM_RESERVED)
    return min(by_regs, by_smem, lim["threads"] // (32 * num_warps), lim["ctas"])


def missing_toolchain() -> str | None:
    """Why this machine cannot compile for an NVIDIA target, or None when it can."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # triton is Linux-only, and older versions lack this API
        return f"triton with ASTSource / GPUTarget is not importable ({e})"
    if not isinstance(nce._infonce_fwd_kernel, triton.runtime.jit.JITFunction):
        return "TRITON_INTERPRET=1: the kernels are interpreter objects"
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        for arch in TARGETS:
            get_ptxas_version(arch)
    except Exception as e:
        return f"no ptxas for the NVIDIA backend ({e})"
    return None


def table(reports: list[Report]) -> str:
    lines = ["kernel         | variant                          | arch  | regs | spills | smem B | CTAs/SM | warps | "
             "compile s"]
    for r in reports:
        lines.append(f"{r.variant.kernel:<14} | {r.variant.key:<32} | sm_{r.arch} | {r.regs:>4} | {r.spills:>6} | "
                     f"{r.smem:>6} | {r.ctas_per_sm:>7} | {r.variant.num_warps:>5} | {r.seconds:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(TARGETS))
    ap.add_argument("--all", action="store_true", help="every flag combination, not only all-on / all-off")
    args = ap.parse_args()
    why = missing_toolchain()
    if why:
        raise SystemExit(f"compile_report: cannot compile: {why}")
    reports = [compile_variant(v, arch) for arch in args.arch for v in variants(args.all)]
    print(table(reports))
    bad = [(r, p) for r in reports for p in r.problems()]
    for r, p in bad:
        print(f"FAIL {r.variant.kernel} {r.variant.key} sm_{r.arch}: {p}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
