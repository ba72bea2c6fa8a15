"""fp16 backward of fused InfoNCE at the weights of large batches (issue 20, item 1), against float64.

The backward kernel rounds one tile of dloss/dlogits to the input dtype for its two dots. With the mean's 1/N and
the logit scale folded in before that cast, every negative pair's entry fell below fp16's smallest subnormal at
N = 64k: the gradient reaching q and p lost all its negative terms. The kernel now rounds only the softmax part
(times a power of two) and applies g * w * s after the dots.

- `test_emulated_cast_order_at_64k`: the kernel's cast order written in plain PyTorch for one 64-row block against all
  65536 columns (N = M = 64k, so w = 0.5 / 65536), fp16 inputs; the old order must fail, the kernel's order pass.
- `test_kernel_backward_under_interpreter`: the Triton backward itself (TRITON_INTERPRET=1 subprocess) at N = M = 48
  with the weights of N = 64k and logit scale 100, fp32 outputs of the launcher against float64.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import ville_kernels.infonce as infonce_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG2E = 1.4426950408889634
# fp16 operands: one rounding of the tile (2^-11 relative) in a sum of many terms; the doc's "1e-3 to 1e-2" band.
FP16_REL_TOL = 2e-3


def _unit_pairs(n: int, m: int, d: int, seed: int):
    """fp16 unit-norm q (n, d) and p (m, d), positive i = column i (i < n) correlated with q_i by a random amount."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    p = torch.randn(m, d, generator=gen) / math.sqrt(d)
    p[:n] += 2.0 * torch.rand(n, 1, generator=gen) * q
    return q.half(), F.normalize(p, dim=-1).half()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - ref).norm() / ref.norm()).item()


def test_emulated_cast_order_at_64k():
    """Row block of 64 rows against M = 65536 columns, s = 14.3 (CLIP's initial scale), w = 0.5 / 65536 (the row
    half of the symmetric mean at N = 64k), g = 1. Both orders share the fp32 logits, log2 units and exp2 of the
    kernel; they differ only in what is rounded to fp16 before the fp32-accumulated dot with p."""
    rows, M, D, s, g = 64, 65536, 64, 14.3, 1.0
    w = 0.5 / M
    q, p = _unit_pairs(rows, M, D, seed=0)
    q32, p32 = q.float(), p.float()
    raw = q32 @ p32.T  # fp16 x fp16 products are exact in fp32: the tensor-core dot's arithmetic
    positive = torch.zeros(rows, M, dtype=torch.bool)
    positive[torch.arange(rows), torch.arange(rows)] = True
    raw64 = q.double() @ p.double().T
    lse64 = torch.logsumexp(s * raw64, dim=1)  # the forward's full row LSE, stored in fp32
    x2 = torch.where(positive, torch.tensor(-1e30), raw * (s * LOG2E))
    soft = torch.exp2(x2 - (lse64 * LOG2E).float()[:, None])

    old_tile = (((w * soft) * g) * s).half()  # the factors folded in, then the cast
    dq_old = old_tile.float() @ p32
    tile_scale = infonce_mod._grad_tile_scale(torch.float16)
    new_tile = (soft * tile_scale).half()  # the kernel's order: only the softmax is rounded
    dq_new = (new_tile.float() @ p32) * (g * w * s / tile_scale)

    soft64 = torch.exp(s * raw64 - lse64[:, None]).masked_fill(positive, 0.0)
    dq64 = (g * w * s) * soft64 @ p.double()
    negatives = ~positive
    flushed_old = (old_tile[negatives] == 0).double().mean().item()
    err_old, err_new = _rel(dq_old, dq64), _rel(dq_new, dq64)
    assert flushed_old > 0.99 and err_old > 0.5, (
        f"the emulation no longer shows the old order's underflow (flushed {flushed_old:.3f}, rel err {err_old:.3e})")
    assert err_new < FP16_REL_TOL, f"kernel cast order: rel err {err_new:.3e} (old order {err_old:.3e})"


KERNEL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from ville_kernels import infonce as m
    assert m._kernels_interpreted()
    a = torch.load(sys.argv[1])
    dq, dp, ds, neg_row, neg_col = m._infonce_bwd(a["q"], a["p"], a["s"], a["g"], a["labels"], None, None,
                                                   a["lse_row"], a["lse_col"], a["w"], a["w"], True)
    torch.save(dict(dq=dq, dp=dp, ds=ds, neg_row=neg_row, neg_col=neg_col), sys.argv[2])
""")


@pytest.mark.timeout(120)
def test_kernel_backward_under_interpreter(tmp_path):
    """The launcher's fp32 dq, dp, ds and negative masses over the negative pairs, symmetric, fp16 inputs, N = M = 48
    (3 x 3 tiles of 16), D = 32, s = 100 (CLIP's maximum), against float64. The tile entries g * w * softmax are
    made those of N = 64k: w = 0.5 / 65536, and since a softmax entry is ~1/N there and ~1/48 here, g = 0.7 * 48 /
    65536 (the old cast order fails this test: dq rel err 7e-2)."""
    pytest.importorskip("triton")
    N, D, s = 48, 32, 100.0
    w, g = 0.5 / 65536, 0.7 * N / 65536
    q, p = _unit_pairs(N, N, D, seed=int.from_bytes(os.urandom(4), "little"))
    raw64 = q.double() @ p.double().T
    lse_row = torch.logsumexp(s * raw64, dim=1)
    lse_col = torch.logsumexp(s * raw64, dim=0)
    args = dict(q=q, p=p, s=torch.tensor(s), g=torch.tensor(g), labels=torch.arange(N), lse_row=lse_row.float(),
                lse_col=lse_col.float(), w=w)
    torch.save(args, tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("VILLE_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    negative = ~torch.eye(N, dtype=torch.bool)
    soft_row = torch.exp(s * raw64 - lse_row[:, None]) * negative
    soft_col = torch.exp(s * raw64 - lse_col[None, :]) * negative
    G = g * w * (soft_row + soft_col)
    ref = dict(dq=s * G @ p.double(), dp=s * G.T @ q.double(), ds=(G * raw64).sum(), neg_row=soft_row.sum(1),
               neg_col=soft_col.sum(0))
    for name in ("dq", "dp"):
        err = _rel(got[name], ref[name])
        assert err < FP16_REL_TOL, f"{name}: rel err {err:.3e} against float64"
    for name in ("ds", "neg_row", "neg_col"):  # fp32 throughout: no fp16 rounding on these
        err = _rel(got[name].reshape(-1), ref[name].reshape(-1))
        assert err < 1e-4, f"{name}: rel err {err:.3e} against float64"
