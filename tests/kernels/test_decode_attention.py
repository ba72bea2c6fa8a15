"""decode_attention vs its fp64 reference: the Triton kernels (through TRITON_INTERPRET on CPU, compiled on CUDA) and
the CPU torch path, over per-sample lengths 1..L_max, GQA ratios, head dims, dtypes, softcap/window and batch_idx
permutations/subsets, with NaN and huge garbage in every cache position the op must not read.

TRITON_INTERPRET: triton 3.9 reads it when it is imported (the @jit helpers of triton.language, tl.cdiv & co., are
decorated then) and when @triton.jit decorates our kernels; dispatch.use_triton reads it at call time. Setting it
inside an already-running pytest is therefore not enough. The interpreted checks run in one subprocess started with
TRITON_INTERPRET=1 (this file run as a script writes a JSON of per-check results), and each check is reported here
as its own test case.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

# import_module, not `import ... as`: the package re-exports a function of the same name as this submodule.
da = importlib.import_module("ville_kernels.decode_attention")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def cpu_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VILLE_KERNELS", "torch")  # the torch CPU path; csrc has its own tests (test_native.py)


def make_inputs(b, bc, hq, hkv, dh, L, dtype, idx, seed=0, device="cpu", garbage="nan"):
    """Random q and caches. Used rows get lengths 1 and L among random ones. garbage="nan": every position at or past
    a row's length holds NaN (odd rows) or dtype max (even rows), and rows no query uses are NaN throughout;
    "finite": those positions hold 100 x N(0, 1) instead; None: they keep ordinary random values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, dh, generator=g).to(dtype)
    k = torch.randn(bc, hkv, L, dh, generator=g).to(dtype)
    v = torch.randn(bc, hkv, L, dh, generator=g).to(dtype)
    if idx == "none":
        rows = torch.arange(b)
    elif idx == "ident":
        rows = torch.arange(b)
    elif idx == "perm":
        rows = torch.randperm(bc, generator=g)
        if torch.equal(rows, torch.arange(bc)):
            rows = rows.roll(1)
    elif idx == "subset":
        rows = torch.randperm(bc, generator=g)[:b]
    else:
        raise ValueError(idx)
    lens = torch.randint(1, L + 1, (bc,), generator=g)
    lens[rows[0]] = L
    if b > 1:
        lens[rows[1]] = 1
    if garbage:
        used = torch.zeros(bc, dtype=torch.bool)
        used[rows] = True
        for r in range(bc):
            start = int(lens[r]) if used[r] else 0
            if garbage == "finite":
                k[r, :, start:] = 100 * torch.randn(k[r, :, start:].shape, generator=g).to(dtype)
                v[r, :, start:] = 100 * torch.randn(v[r, :, start:].shape, generator=g).to(dtype)
                continue
            fill = float("nan") if (r % 2 or not used[r]) else torch.finfo(dtype).max
            k[r, :, start:] = fill
            v[r, :, start:] = fill
    batch_idx = None if idx == "none" else rows.to(torch.int32 if seed % 2 else torch.int64)
    cache_lens = lens.to(torch.int64 if seed % 2 else torch.int32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(cache_lens), to(batch_idx)


def assert_within_budget(out, q, k, v, cache_lens, batch_idx, **kw):
    """flash-attention's rule: error vs fp64 at most twice that of the same math in PyTorch at q's precision."""
    ref64 = da.decode_attention_ref(q, k, v, cache_lens, batch_idx, upcast=True, **kw)
    ref_low = da.decode_attention_ref(q, k, v, cache_lens, batch_idx, upcast=False, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(ref64).all(), "reference read garbage (test bug)"
    assert torch.isfinite(out).all(), "NaN/inf in output"
    err = (out.double() - ref64).abs().max().item()
    budget = (ref_low.double() - ref64).abs().max().item()
    floor = 0.5 * torch.finfo(q.dtype).eps
    assert err <= 2 * budget + floor, f"max err {err:.3g} > 2 x torch-{q.dtype} err {budget:.3g} + {floor:.1g}"


# (b, bc, hq, hkv, dh, L, dtype, softcap, window, idx): every dtype x {plain, softcap, window, both} at a small
# shape, then GQA ratios 1/2/4/8 x head dims 16..256 (80: a non-power-of-two multiple of 16) at tiny B and L.
CASES = []
for i, dt in enumerate(DTYPES):
    for j, (cap, win) in enumerate([(None, None), (2.0, None), (None, 7), (2.0, 5)]):
        CASES.append((3, 5 if j % 2 else 3, 8, 2, 32, 37, dt, cap, win, ["none", "subset", "perm", "subset"][j]))
CASES += [
    (2, 2, 4, 4, 16, 50, "fp32", None, None, "perm"),
    (3, 4, 8, 4, 16, 33, "bf16", 2.0, None, "subset"),
    (2, 3, 16, 4, 32, 21, "fp16", None, 9, "subset"),
    (2, 2, 8, 1, 16, 40, "fp32", 2.0, 6, "ident"),
    (1, 3, 8, 8, 80, 19, "bf16", None, None, "subset"),
    (2, 2, 4, 2, 64, 17, "fp16", None, None, "perm"),
    (2, 3, 8, 1, 64, 24, "bf16", 2.0, None, "subset"),
    (2, 2, 8, 2, 128, 13, "fp32", None, 4, "none"),
    (1, 2, 16, 2, 128, 18, "bf16", None, None, "subset"),
    (2, 2, 8, 4, 256, 11, "bf16", 2.0, None, "perm"),
    (1, 1, 2, 1, 256, 20, "fp16", None, None, "none"),
    (1, 1, 2, 2, 32, 1, "fp32", None, None, "none"),
]


def case_id(c):
    b, bc, hq, hkv, dh, L, dt, cap, win, idx = c
    extra = ("-cap" if cap else "") + (f"-win{win}" if win else "")
    return f"b{b}-bc{bc}-hq{hq}-hkv{hkv}-dh{dh}-L{L}-{dt}-{idx}{extra}"


def run_case(mod, c, seed, garbage="nan"):
    b, bc, hq, hkv, dh, L, dt, cap, win, idx = c
    q, k, v, lens, bi = make_inputs(b, bc, hq, hkv, dh, L, DTYPES[dt], idx, seed=seed, garbage=garbage)
    out = mod.decode_attention(q, k, v, lens, bi, softcap=cap, window=win)
    assert_within_budget(out, q, k, v, lens, bi, softcap=cap, window=win)


def check_forced_splits(mod, num_splits, block_n):
    """Split counts the heuristic may not pick: one split (direct write), uneven splits, and more splits than tiles
    (empty splits must weigh nothing in the combine)."""
    q, k, v, lens, bi = make_inputs(3, 4, 8, 2, 32, 45, torch.float32, "subset", seed=num_splits)
    out = mod._decode_attention_fwd(q, k, v, lens, bi, 32 ** -0.5, 2.0, None, num_splits=num_splits, block_n=block_n)
    assert_within_budget(out, q, k, v, lens, bi, softcap=2.0)


def check_strided_and_hidden_window_nan(mod):
    """HF-style (Bc, L, Hkv, D) caches viewed as (Bc, Hkv, L, D), a non-contiguous q, an explicit scale, and NaN in
    the positions a sliding window hides (valid cache data that must still never leak)."""
    q, k, v, lens, bi = make_inputs(3, 4, 8, 2, 32, 30, torch.bfloat16, "subset", seed=7)
    window = 6  # the row of length 30 hides positions [0, 24)
    for r, n in zip(bi.tolist(), lens[bi].tolist()):
        k[r, :, : max(n - window, 0)] = float("nan")
        v[r, :, : max(n - window, 0)] = float("nan")
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    v = v.transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.randn(8, 3, 32).to(torch.bfloat16).transpose(0, 1)
    out = mod.decode_attention(q, k, v, lens, bi, scale=0.3, window=window)
    assert_within_budget(out, q, k, v, lens, bi, scale=0.3, window=window)


def interpreted_checks():
    """Name -> check(module) for everything that runs the Triton kernels through the interpreter."""
    checks = {f"api-{case_id(c)}": (lambda mod, c=c: run_case(mod, c, seed=CASES.index(c))) for c in CASES}
    for ns, bn in [(1, 16), (2, 16), (5, 16), (16, 16), (3, 32)]:
        checks[f"splits{ns}-block{bn}-b3-hq8-hkv2-dh32-L45-fp32-cap"] = (
            lambda mod, ns=ns, bn=bn: check_forced_splits(mod, ns, bn))
    checks["strided-hiddennan-b3-hq8-hkv2-dh32-L30-bf16-subset-win6"] = check_strided_and_hidden_window_nan
    return checks


def _interpreted_worker(out_path):
    """Subprocess side: started with TRITON_INTERPRET=1, runs every interpreted check, writes {name: "ok" | error}."""
    assert da._kernels_interpreted(), "the worker must start with TRITON_INTERPRET=1"

    def no_torch_path(*args, **kwargs):
        raise AssertionError("dispatch chose the torch path under TRITON_INTERPRET=1")

    da._decode_attention_torch = no_torch_path
    results = {}
    for name, check in interpreted_checks().items():
        try:
            check(da)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is reported back to its own test case
            results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("decode_attention_interpret") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("VILLE_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=170)
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", list(interpreted_checks()))
def test_triton_interpreted(interpreted_results, name):
    assert interpreted_results[name] == "ok", interpreted_results[name]


@pytest.mark.parametrize("garbage", ["nan", "finite"])
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_torch_cpu_path(cpu_env, c, garbage):
    """"finite" garbage takes the path that skips zeroing hidden V rows, so the score mask alone must hold."""
    assert not da.use_triton(torch.empty(1))
    run_case(da, c, seed=CASES.index(c), garbage=garbage)


def test_torch_cpu_path_strided_and_hidden_window_nan(cpu_env):
    check_strided_and_hidden_window_nan(da)


def test_active_subset_matches_full_batch(cpu_env):
    """Dropping finished samples through batch_idx gives exactly their rows of the full-batch result."""
    q, k, v, lens, _ = make_inputs(6, 6, 8, 2, 32, 40, torch.float32, "none", seed=3, garbage="nan")
    full = da.decode_attention(q, k, v, lens)
    keep = torch.tensor([4, 1, 5])
    part = da.decode_attention(q[keep], k, v, lens, keep)
    assert (part - full[keep]).abs().max().item() <= 1e-6


def test_torch_path_gradients(cpu_env):
    """With autograd on, dispatch takes the differentiable torch path; its gradients match the fp64 reference's."""
    q, k, v, lens, bi = make_inputs(3, 4, 8, 2, 16, 21, torch.float32, "subset", seed=5, garbage=None)
    grad_out = torch.randn(q.shape)
    grads = []
    for fn, dtype in [(da.decode_attention, torch.float32), (da.decode_attention_ref, torch.float64)]:
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, lens, bi, softcap=2.0, window=9)
        (out * grad_out.to(dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip("qkv", *grads):
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()), f"d{name}: max err {err:.3g}"


def test_split_heuristic():
    assert da._num_splits(batch=256, kv_heads=4, span=3072, block_n=64, num_sms=132) == 1
    s = da._num_splits(batch=16, kv_heads=4, span=3072, block_n=64, num_sms=132)
    assert 2 <= s <= da._MAX_SPLITS and 3072 / s >= 2 * 64
    assert da._num_splits(batch=1, kv_heads=1, span=100, block_n=64, num_sms=132) == 1  # short span: no split
    assert da._num_splits(batch=1, kv_heads=1, span=1 << 20, block_n=64, num_sms=132) == da._MAX_SPLITS


def test_env_set_after_import_is_reported(monkeypatch):
    pytest.importorskip("triton")
    if da._kernels_interpreted():
        pytest.skip("pytest itself runs under TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VILLE_KERNELS", raising=False)
    q, k, v, lens, _ = make_inputs(2, 2, 4, 2, 16, 8, torch.float32, "none")
    with pytest.raises(RuntimeError, match="before importing triton"):
        da.decode_attention(q, k, v, lens)


def _bad(**over):
    q, k, v, lens, bi = make_inputs(2, 3, 4, 2, 16, 8, torch.float32, "subset", garbage=None)
    args = dict(q=q, k_cache=k, v_cache=v, cache_lens=lens, batch_idx=bi)
    args.update({name: f(args) for name, f in over.items()})
    return args


BAD = {
    "q-rank": (_bad(q=lambda a: a["q"][0]), "q \\(B, Hq, Dh\\)"),
    "gqa": (_bad(q=lambda a: torch.randn(2, 3, 16)), "multiple of kv heads"),
    "dtype": (_bad(k_cache=lambda a: a["k_cache"].double(), v_cache=lambda a: a["v_cache"].double()), "dtype"),
    "v-shape": (_bad(v_cache=lambda a: a["v_cache"][:, :, :4]), "v_cache must have"),
    "head-dim": (_bad(q=lambda a: torch.randn(2, 4, 8)), "head dim"),
    "idx-range": (_bad(batch_idx=lambda a: torch.tensor([0, 3])), "batch_idx must lie in \\[0, B_cache=3\\)"),
    "idx-negative": (_bad(batch_idx=lambda a: torch.tensor([-1, 0])), "batch_idx must lie"),
    "idx-shape": (_bad(batch_idx=lambda a: torch.tensor([0, 1, 2])), "batch_idx must be int32/int64 of shape"),
    "idx-float": (_bad(batch_idx=lambda a: torch.tensor([0.0, 1.0])), "batch_idx must be int32/int64"),
    "no-idx": (_bad(batch_idx=lambda a: None), "must equal the cache's rows"),
    "len-zero": (_bad(cache_lens=lambda a: a["cache_lens"].index_fill(0, a["batch_idx"][:1].long(), 0)),
                 "cache_lens of used rows must lie in \\[1, L_max=8\\]"),
    "len-over": (_bad(cache_lens=lambda a: a["cache_lens"].index_fill(0, a["batch_idx"][1:].long(), 9)),
                 "cache_lens of used rows"),
    "lens-shape": (_bad(cache_lens=lambda a: a["cache_lens"][:2]), "cache_lens must be int32/int64 of shape"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(cpu_env, name):
    args, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        da.decode_attention(**args)


def test_bad_scalar_args_raise(cpu_env):
    args = _bad()
    with pytest.raises(ValueError, match="softcap"):
        da.decode_attention(**args, softcap=0.0)
    with pytest.raises(ValueError, match="window"):
        da.decode_attention(**args, window=0)


def test_unused_row_lengths_are_not_checked(cpu_env):
    """A finished sample's row may hold any length (even 0): only rows named by batch_idx are validated."""
    args = _bad()
    unused = ({0, 1, 2} - set(args["batch_idx"].tolist())).pop()
    args["cache_lens"][unused] = 0
    out = da.decode_attention(**args)
    assert torch.isfinite(out).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("c", [
    (4, 6, 8, 4, 256, 3072, "bf16", 50.0, None, "subset"),
    (16, 16, 32, 8, 128, 1024, "bf16", None, None, "perm"),
    (3, 3, 32, 8, 64, 777, "fp16", None, 128, "none"),
    (64, 80, 8, 4, 256, 300, "fp32", None, None, "subset"),
] + CASES, ids=case_id)
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_cuda(monkeypatch, c, path):
    if path == "torch":
        monkeypatch.setenv("VILLE_KERNELS", "torch")
    else:
        monkeypatch.delenv("VILLE_KERNELS", raising=False)
    b, bc, hq, hkv, dh, L, dt, cap, win, idx = c
    q, k, v, lens, bi = make_inputs(b, bc, hq, hkv, dh, L, DTYPES[dt], idx, seed=1, device="cuda")
    out = da.decode_attention(q, k, v, lens, bi, softcap=cap, window=win, check=True)
    assert_within_budget(out, q, k, v, lens, bi, softcap=cap, window=win)


if __name__ == "__main__":
    _interpreted_worker(sys.argv[1])
