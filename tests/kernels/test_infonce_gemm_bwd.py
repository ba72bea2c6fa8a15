"""The "gemm" backward provider of fused InfoNCE (VILLE_INFONCE_BWD=gemm, ville_kernels/infonce_gemm.py): recompute
kernel writing G in the input dtype, then dq = G @ p and dp += G^T @ q as matmuls.

- `test_gemm_provider_interpreted`: fused_infonce's dq, dp and d(logit_scale) with the gemm backward against the fp64
  reference, by test_infonce's tolerance rule (at most about twice the error of the same loss in PyTorch at the
  inputs' precision); odd shapes, fp32/bf16/fp16, symmetric and not, labels and groups; the G chunk is cut to 16
  rows so every case runs several chunks (a ragged last one included). The atomic launcher is forbidden.
- `test_gemm_equals_atomic_interpreted`: both providers' launcher outputs on the same inputs agree to fp32 rounding
  (same G entries, sums in another order).
- `test_gemm_fp16_small_softmax_interpreted`: fp16 G keeps softmax entries below fp16's normal range, as at N = 64k
  (the 2^14 tile scale, undone after the GEMM), against float64.
The Triton kernels run through the interpreter in one TRITON_INTERPRET=1 subprocess
(test_triton_gemm_under_interpreter), as in test_infonce.py; on a GPU the CUDA cases run (test_gemm_provider_cuda).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ville_kernels.infonce as infonce_mod
import ville_kernels.infonce_gemm as gemm_mod
from test_infonce import DTYPES, Case, _cases, _forbidden, check_case

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GEMM_CASES = _cases([(37, 53, 96)], ["sym-labels-groups", "row-labels"], ["fp32", "bf16", "fp16"]) + [
    Case(19, 19, 40, "bf16", "sym")]
CUDA_CASES = (_cases([(130, 257, 768)], ["sym-labels-groups", "row-labels"], ["fp32", "bf16", "fp16"])
              + _cases([(5000, 5000, 256)], ["sym"], ["fp32", "bf16", "fp16"]))
INNER_TESTS = len(GEMM_CASES) + 3 + 1  # the parametrised cases, three dtypes of the equality test, the fp16 test


def _use_gemm(monkeypatch, m, dtype, chunk_rows=16):
    """Select the gemm provider, forbid the atomic one and the torch path, and cut G chunks to `chunk_rows` rows (a
    multiple of BLOCK_N) at M = m columns of `dtype`."""
    monkeypatch.delenv("VILLE_KERNELS", raising=False)
    monkeypatch.setenv("VILLE_INFONCE_BWD", "gemm")
    monkeypatch.setattr(infonce_mod, "_infonce_bwd_atomic", _forbidden)
    monkeypatch.setattr(infonce_mod, "_infonce_fwd_torch", _forbidden)
    monkeypatch.setattr(infonce_mod, "_infonce_bwd_torch", _forbidden)
    monkeypatch.setattr(gemm_mod, "GEMM_CHUNK_BYTES", chunk_rows * m * torch.finfo(dtype).bits // 8)


def test_chunk_rows_fit_the_budget():
    """Hand-computed: 256 MB / (65536 columns * 2 bytes) = 2048 rows; at M = 1M, 128; fp32 halves them; a budget
    under one row block still gets one block; small N rounds up to whole row blocks."""
    mb256 = 256 << 20
    assert gemm_mod.gemm_chunk_rows(65536, 65536, torch.bfloat16, 64, mb256) == 2048
    assert gemm_mod.gemm_chunk_rows(1 << 20, 1 << 20, torch.float16, 64, mb256) == 128
    assert gemm_mod.gemm_chunk_rows(65536, 65536, torch.float32, 64, mb256) == 1024
    assert gemm_mod.gemm_chunk_rows(65536, 65536, torch.bfloat16, 64, 1000) == 64
    assert gemm_mod.gemm_chunk_rows(37, 53, torch.bfloat16, 16, mb256) == 48
    assert gemm_mod.gemm_chunk_rows(100_000, 3000, torch.bfloat16, 64, 3000 * 2 * 200) == 192


def test_unknown_provider_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("VILLE_INFONCE_BWD", "fast")
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"VILLE_INFONCE_BWD='fast': expected one of atomic, gemm"):
        infonce_mod._infonce_bwd(q, q, torch.tensor(1.0), torch.tensor(1.0), torch.arange(4), None, None,
                                 torch.zeros(4), torch.zeros(4), 0.125, 0.125, True)


@pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: c.id)
def test_gemm_provider_interpreted(case, monkeypatch):
    assert infonce_mod._kernels_interpreted()
    _use_gemm(monkeypatch, case.m, DTYPES[case.dtype])
    check_case(case)


def _launcher_inputs(dtype, n, m, d, seed, scale=30.0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    p = torch.randn(m, d, generator=gen) / math.sqrt(d)
    labels = torch.randperm(m, generator=gen)[:n]
    p[labels] += 2.0 * torch.rand(n, 1, generator=gen) * q
    q, p = q.to(dtype), F.normalize(p, dim=-1).to(dtype)
    raw = scale * q.double() @ p.double().T
    lse_row = torch.logsumexp(raw, 1)
    lse_col = torch.full((m,), float("inf"), dtype=torch.float64)
    lse_col[labels] = torch.logsumexp(raw, 0)[labels]
    groups = torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 5, (m,), generator=gen)
    return q, p, torch.tensor(scale), labels, groups, raw, lse_row, lse_col


@pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gemm_equals_atomic_interpreted(dtype, monkeypatch):
    """Symmetric with groups, N = 37, M = 53, D = 40: dq, dp, ds, neg_row, neg_col of both launchers within 1e-5 of
    the largest value (fp32 sums in another order; a wrong mask, factor or chunk seam is off by far more)."""
    seed = int.from_bytes(os.urandom(4), "little")
    q, p, s, labels, (row_groups, col_groups), _, lse_row, lse_col = _launcher_inputs(dtype, 37, 53, 40, seed)
    args = (q, p, s, torch.tensor(-0.8), labels, row_groups, col_groups, lse_row.float(), lse_col.float(),
            0.5 / 37, 0.5 / 37, True)
    monkeypatch.setenv("VILLE_INFONCE_BWD", "atomic")
    atomic = infonce_mod._infonce_bwd(*args)
    _use_gemm(monkeypatch, 53, dtype)
    gemm = infonce_mod._infonce_bwd(*args)
    for name, a, g in zip(("dq", "dp", "ds", "neg_row", "neg_col"), atomic, gemm):
        assert g.dtype == torch.float32 and g.shape == a.shape, name
        err = (g - a).abs().max().item()
        assert err <= 1e-5 * a.abs().max().item() + 1e-30, f"seed={seed} {name}: max|gemm - atomic| = {err:.3e}"


@pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")
def test_gemm_fp16_small_softmax_interpreted(monkeypatch):
    """fp16 G where every negative's softmax entry is 1e-7 to 1e-5, below fp16's normal range (6.1e-5), as at
    N = 64k where an average entry is 1.5e-5: N = M = 48, D = 128, s = 100, each q_i = p_i near one common direction
    (negatives' cosine ~0.83, ~17 nats below the positive). Launcher dq, dp within 2e-3 relative of float64 (one
    fp16 rounding of G); without the 2^14 tile scale G's entries are subnormal (spacing 6e-8) and miss by ~1e-2."""
    N, D, s = 48, 128, 100.0
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(D, generator=gen), dim=0)
    noise = torch.randn(N, D, generator=gen)
    noise = F.normalize(noise - (noise @ common)[:, None] * common, dim=-1)  # orthogonal to the common direction
    q = F.normalize(common + 0.45 * noise, dim=-1).half()
    p = q.clone()
    raw = s * q.double() @ p.double().T
    lse_row, lse_col = torch.logsumexp(raw, 1), torch.logsumexp(raw, 0)
    negative = ~torch.eye(N, dtype=torch.bool)
    soft_row = torch.exp(raw - lse_row[:, None]) * negative
    soft_col = torch.exp(raw - lse_col[None, :]) * negative
    assert soft_row[negative].max() < 6.1e-5 and soft_col[negative].max() < 6.1e-5  # the premise of the test
    _use_gemm(monkeypatch, N, torch.float16)
    w, g = 0.5 / N, 0.9
    dq, dp, ds, _, _ = infonce_mod._infonce_bwd(q, p, torch.tensor(s), torch.tensor(g), torch.arange(N), None, None,
                                                lse_row.float(), lse_col.float(), w, w, True)
    G = g * w * (soft_row + soft_col)
    for name, got, ref in (("dq", dq, s * G @ p.double()), ("dp", dp, s * G.T @ q.double())):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"seed={seed} {name}: rel err {err:.3e} against float64"
    ref_ds = (G * raw / s).sum().item()
    assert abs(ds.item() - ref_ds) <= 1e-4 * abs(ref_ds), f"seed={seed} ds {ds.item():.6e} vs {ref_ds:.6e}"


@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 is set: the interpreted cases run in this process")
@pytest.mark.timeout(300)
def test_triton_gemm_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("VILLE_KERNELS", None)
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "-k", "interpreted"]
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=290)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == INNER_TESTS, out[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_gemm_provider_cuda(case, monkeypatch):
    _use_gemm(monkeypatch, case.m, DTYPES[case.dtype], chunk_rows=128)  # 2 chunks at N = 130, 40 at 5000
    check_case(case, device="cuda")
