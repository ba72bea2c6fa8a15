"""Every kernel variant the launchers can choose compiles for sm_90 (H100) and sm_80 (A100) without a GPU, within
budget: no register spills, shared memory under the target's per-block limit, at most 240 registers.

`ville_kernels.compile_report` enumerates the variants from the launchers' own block-size functions and compiles
them with Triton's bundled ptxas; the table (registers, spills, shared memory, resident blocks per SM) is printed.
Default run, 42 variants per target (about 50 s of CPU for both): fp32 and bf16 (fp16 compiles to bf16's registers),
per shape choice (InfoNCE forward/backward and the gemm backward's recompute kernel; decode head dim 64/128/256 at
GQA group 1 and 32; the combine kernel at 64 splits) the variant with every optional path on (groups + symmetric;
softcap + batch_idx + window + split-K) and the one with none. Every one of the 630 variants (fp16, groups 2 and 8,
each flag combination): VILLE_COMPILE_ALL=1 (marker `compile_all`; ~12 min of CPU). Skips, saying why, where
Triton or ptxas is missing.
"""
from __future__ import annotations

import os

import pytest

from ville_kernels import compile_report

WHY_NOT = compile_report.missing_toolchain()


def _check(arch: int, everything: bool, capsys) -> None:
    if WHY_NOT:
        pytest.skip(f"cannot compile for sm_{arch}: {WHY_NOT}")
    reports = [compile_report.compile_variant(v, arch) for v in compile_report.variants(everything)]
    with capsys.disabled():
        print(f"\n{compile_report.table(reports)}")
    problems = [f"{r.variant.kernel} {r.variant.key} sm_{arch}: {p}" for r in reports for p in r.problems()]
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm{a}")
def test_kernel_variants_compile_within_budget(arch, capsys):
    _check(arch, everything=False, capsys=capsys)


@pytest.mark.compile_all
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("VILLE_COMPILE_ALL") != "1", reason="every flag combination: VILLE_COMPILE_ALL=1")
@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm{a}")
def test_every_kernel_variant_compiles_within_budget(arch, capsys):
    _check(arch, everything=True, capsys=capsys)


def test_ctas_per_sm_follows_the_tightest_limit():
    """Hand-computed: 128 regs x 8 warps = 32768 of 65536 registers -> 2 blocks; 129 regs round up to 136 per thread
    (256-register warp granules) -> 1; 48 KB + 1 KB reserved of sm_80's 164 KB -> 3; 1 warp -> the 32-block cap."""
    assert compile_report.ctas_per_sm(90, 128, 1024, 8) == 2
    assert compile_report.ctas_per_sm(90, 129, 1024, 8) == 1
    assert compile_report.ctas_per_sm(80, 32, 48 * 1024, 4) == 3
    assert compile_report.ctas_per_sm(90, 16, 0, 1) == 32
