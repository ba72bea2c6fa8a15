"""The native CPU kernels (csrc/, `ville_kernels._C`, loaded by kernels/ville_kernels/native.py) behind the custom
ops registered in kernels/ville_kernels/infonce.py and decode_attention.py.

Same checks and tolerance rule as tests/kernels/test_infonce.py and test_decode_attention.py (whose case builders
and comparisons this file reuses): every output and gradient against the fp64 reference, at most twice the error of
the same computation in PyTorch at that precision plus a tiny floor; NaN never passes. Each case also proves the
csrc kernel ran (the PyTorch paths are replaced by a function that fails). Shapes past 256 rows / columns cross the
kernel's tile and thread seams. Skips, with the reason, when the extension is not built.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import ville_kernels
import ville_kernels.infonce as infonce_mod
from ville_kernels import native

from test_decode_attention import CASES as DECODE_CASES
from test_decode_attention import assert_within_budget, case_id, check_strided_and_hidden_window_nan, make_inputs
from test_infonce import MODES, Case, _cases, _forbidden, check_case

da = importlib.import_module("ville_kernels.decode_attention")  # the package attribute is the function

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not native.LOADED, reason=f"native extension ville_kernels._C not available "
                                                          f"({native.LOAD_ERROR}); build it with pip install -e .")

INFONCE_CASES = (_cases([(1, 1, 16), (1, 7, 16), (7, 7, 96), (37, 53, 96)], MODES, ["fp32", "bf16", "fp16"])
                 + _cases([(300, 300, 64)], ["sym", "sym-groups"], ["fp32", "bf16"])
                 + _cases([(300, 530, 96)], ["sym-labels-groups", "row-labels", "row-duplabels"], ["fp32", "bf16"])
                 + _cases([(130, 257, 768)], ["sym-labels-groups"], ["bf16"])
                 + [Case(37, 53, 96, "fp32", "sym-labels-noncontig"), Case(40, 40, 16, "fp32", "sym-extreme"),
                    Case(40, 40, 16, "fp32", "sym-groups-extreme")])


@pytest.fixture
def csrc_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("VILLE_KERNELS", raising=False)
    for name in ("_infonce_fwd_torch", "_infonce_bwd_torch", "_infonce_fwd", "_infonce_bwd"):
        monkeypatch.setattr(infonce_mod, name, _forbidden)
    monkeypatch.setattr(da, "_decode_attention_torch", _forbidden)
    monkeypatch.setattr(da, "_decode_attention_torch_rows", _forbidden)


def test_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("VILLE_KERNELS", raising=False)
    assert ville_kernels.backends()["infonce"]["cpu"] == "csrc"
    assert ville_kernels.backends()["decode_attention"]["cpu"] == "csrc"
    monkeypatch.setenv("VILLE_KERNELS", "torch")
    assert ville_kernels.backends() == {"infonce": {"cpu": "torch-chunked", "cuda": "torch"},
                                        "decode_attention": {"cpu": "torch", "cuda": "torch"}}


def test_no_ext_falls_back():
    """VILLE_NO_EXT=1 at import: the extension is not loaded and the CPU ops run their PyTorch paths."""
    code = ("import torch, ville_kernels as vk; q = torch.randn(5, 8); "
            "print(vk.backends()['infonce']['cpu'], float(vk.fused_infonce(q, q + 0.1, 10.0)))")
    env = dict(os.environ, VILLE_NO_EXT="1", TRITON_INTERPRET="0")
    env.pop("VILLE_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "torch-chunked", run.stdout


@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: c.id)
def test_infonce(csrc_env, case):
    check_case(case)


@pytest.mark.parametrize("c", DECODE_CASES, ids=case_id)
def test_decode_attention(csrc_env, c):
    b, bc, hq, hkv, dh, L, dt, cap, win, idx = c
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    q, k, v, lens, bi = make_inputs(b, bc, hq, hkv, dh, L, dtype, idx, seed=DECODE_CASES.index(c), garbage="nan")
    out = da.decode_attention(q, k, v, lens, bi, softcap=cap, window=win)
    assert_within_budget(out, q, k, v, lens, bi, softcap=cap, window=win)


def test_decode_attention_strided_caches(csrc_env):
    check_strided_and_hidden_window_nan(da)


def test_decode_attention_long_span_many_tasks(csrc_env):
    """More (b, kv head) tasks than threads, a 700-position span, GQA 4."""
    q, k, v, lens, bi = make_inputs(5, 7, 16, 4, 64, 700, torch.bfloat16, "subset", seed=11, garbage="nan")
    assert_within_budget(da.decode_attention(q, k, v, lens, bi, softcap=30.0), q, k, v, lens, bi, softcap=30.0)


def test_bad_values_raise_inside_the_kernel():
    """Under torch.compile the host-side value checks are skipped; the kernel's own checks must catch these."""
    q, k, v, lens, _ = make_inputs(2, 3, 4, 2, 16, 9, torch.float32, "none", garbage=None)
    with pytest.raises(RuntimeError, match="batch_idx"):
        torch.ops.ville_kernels.decode_attention(q[:2], k, v, lens, torch.tensor([0, 3]), 0.25, None, None)
    with pytest.raises(RuntimeError, match="cache_lens"):
        torch.ops.ville_kernels.decode_attention(q[:2], k, v, torch.tensor([0, 9, 9]), torch.tensor([0, 1]), 0.25,
                                                 None, None)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.ville_kernels.infonce_fwd(x, x, torch.tensor(1.0), torch.tensor([0, 1, 2, 4]), None, None, True)
    with pytest.raises(RuntimeError, match="distinct"):
        torch.ops.ville_kernels.infonce_fwd(x, x, torch.tensor(1.0), torch.tensor([0, 1, 1, 2]), None, None, True)


def test_torch_compile_fullgraph_infonce(csrc_env):
    torch._dynamo.reset()
    q0, p0 = torch.randn(37, 32), torch.randn(53, 32)
    labels = torch.randperm(53)[:37]
    groups = (torch.randint(0, 5, (37,)), torch.randint(0, 5, (53,)))
    groups[1][labels] = groups[0]

    def loss_fn(q, p, s):
        return ville_kernels.fused_infonce(q, p, s, labels=labels, groups=groups, symmetric=True) * 3.0

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="inductor")):
        q, p = q0.clone().requires_grad_(), p0.clone().requires_grad_()
        s = torch.tensor(20.0, requires_grad=True)
        loss = fn(q, p, s)
        loss.backward()
        results.append([loss.detach(), q.grad, p.grad, s.grad])
    for eager, compiled in zip(*results):
        assert torch.isfinite(compiled).all()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_decode_attention(csrc_env):
    torch._dynamo.reset()
    q, k, v, lens, bi = make_inputs(3, 5, 8, 2, 32, 37, torch.float32, "subset", seed=2, garbage="nan")

    def step(q, k, v, lens, bi):
        return ville_kernels.decode_attention(q * 2.0, k, v, lens, bi, softcap=5.0, window=20) + 1.0

    eager = step(q, k, v, lens, bi)
    compiled = torch.compile(step, fullgraph=True)(q, k, v, lens, bi)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
