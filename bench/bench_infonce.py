"""Benchmark: symmetric CLIP/InfoNCE loss, forward and forward+backward, providers side by side.

Providers
    naive    open_clip's ClipLoss: logits = s * q @ p.T, cross-entropy both ways (materialises N x M)
    chunked  ville_kernels.fused_infonce on its PyTorch path (VILLE_KERNELS=torch): row chunks, O(chunk * M) memory
    triton_atomic  ville_kernels.fused_infonce on CUDA (the Triton kernels), backward VILLE_INFONCE_BWD=atomic: one
             pass, each tile multiplied into dq / dp with fp32 atomics
    triton_gemm    the same forward, backward VILLE_INFONCE_BWD=gemm: a recompute kernel writes G in row chunks
             (bf16/fp16, fp32 for fp32 inputs), then dq = G @ p and dp += G^T @ q on cuBLAS (infonce_gemm.py);
             `--providers triton` means both, so the first GPU run shows which backward wins
    csrc     the native CPU kernels (csrc/, ville_kernels._C) through their custom op; CPU only, needs the build
    inf_cl   Inf-CL's cal_flash_loss if the `inf_cl` package is importable; its symmetric loss is two
             one-directional calls (the similarity is computed twice), on fp32 copies of the inputs

Usage
    python bench/bench_infonce.py                        # GPU: N=M in {4k,16k,64k,256k}, D in {512,1024}, bf16
                                                         # CPU: N=M in {1k,4k}, D=256, fp32
    python bench/bench_infonce.py --sizes 2k,8k --dims 128 --dtype fp32 --quick
    python bench/bench_infonce.py --providers triton --gemm-chunk-mb 1024     # both backwards, 1 GB G chunks

FLOP rule: one similarity pass is 2*N*M*D. Forward counts 1 pass (the symmetric loss shares it), forward+backward
counts 4 (forward 1, backward 3: recomputation, dq, dp), whatever a provider actually executes; "bwd" is fwd+bwd
minus fwd (3 passes).
Memory: on CUDA torch.cuda.max_memory_allocated() during the call minus what was allocated before it (inputs);
on CPU the growth of the process's peak RSS during one call (peak mark reset with /proc/self/clear_refs, then
VmHWM minus the RSS before the call), in a fresh subprocess per provider and size.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `bench/` is not a package; make `ville_kernels` importable from a source checkout too

from ville_kernels import fused_infonce, infonce_gemm, native  # noqa: E402
from ville_kernels.infonce import _infonce_op  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- providers: fn(q, p, s) -> scalar loss ---------------------------------------------------------------------------
def naive_loss(q, p, s):
    logits = s * q @ p.T
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class _Env:
    """Set one environment variable for the duration of a `with` block (ville_kernels reads them at each call)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        self.previous = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.previous is None:
            del os.environ[self.name]
        else:
            os.environ[self.name] = self.previous


def chunked_loss(q, p, s):
    with _Env("VILLE_KERNELS", "torch"):
        return fused_infonce(q, p, s)


class _TritonLoss:
    """fused_infonce on the Triton kernels with the given backward provider: `step` sets `env` around forward and
    backward (VILLE_INFONCE_BWD is read when the backward runs)."""

    def __init__(self, backward_provider):
        self.env = ("VILLE_INFONCE_BWD", backward_provider)

    def __call__(self, q, p, s):
        return fused_infonce(q, p, s)


def csrc_loss(q, p, s):
    return _infonce_op(q, p, s)


def _inf_cl():
    try:
        from inf_cl import cal_flash_loss
    except Exception as exc:  # not installed, or no GPU build
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:80]
    return cal_flash_loss, ""


def inf_cl_loss(q, p, s):
    cal_flash_loss, _ = _inf_cl()
    # cal_flash_loss returns per-row losses of one direction; their symmetric loss is two calls
    return 0.5 * (cal_flash_loss(q, p, scale=s).mean() + cal_flash_loss(p, q, scale=s).mean())


PROVIDERS = {"naive": naive_loss, "chunked": chunked_loss, "triton_atomic": _TritonLoss("atomic"),
             "triton_gemm": _TritonLoss("gemm"), "csrc": csrc_loss, "inf_cl": inf_cl_loss}
ALIASES = {"triton": ["triton_atomic", "triton_gemm"]}


def parse_size(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def make_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    p = F.normalize(torch.randn(n, d, generator=gen) + q, dim=-1)
    q = q.to(device=device, dtype=dtype).requires_grad_()
    p = p.to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(100.0, device=device, requires_grad=True)
    return q, p, s


def step(fn, q, p, s, backward):
    """One call. Forward runs with grad-enabled inputs, as in training (what a provider saves for backward counts)."""
    q.grad = p.grad = s.grad = None
    with _Env(*fn.env) if hasattr(fn, "env") else contextlib.nullcontext():
        loss = fn(q, p, s)
        if backward:
            loss.backward()
    return loss


# ---- timing and memory -----------------------------------------------------------------------------------------------
def time_ms(fn, q, p, s, backward, reps):
    if q.is_cuda:
        import triton.testing

        return triton.testing.do_bench(lambda: step(fn, q, p, s, backward), warmup=25, rep=max(100, 20 * reps),
                                       return_mode="median")
    step(fn, q, p, s, backward)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(fn, q, p, s, backward)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_peak_mb(fn, q, p, s, backward):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(fn, q, p, s, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from bench_infonce import PROVIDERS, make_inputs, peak_rss_mb, reset_peak_rss, step
q, p, s = make_inputs({n}, {d}, getattr(torch, {dtype!r}), "cpu")
fn = PROVIDERS[{provider!r}]
step(fn, q[:8].detach().requires_grad_(), p[:8].detach().requires_grad_(), s, True)  # lazy library buffers
out = {{}}
for backward in (False, True):
    before = reset_peak_rss()
    step(fn, q, p, s, backward)
    out["fwdbwd" if backward else "fwd"] = peak_rss_mb() - before
print(json.dumps(out))
"""


def _proc_status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: clear_refs 5) and return the current RSS in MB.
    Without the reset, a transient peak from importing torch would hide every allocation smaller than it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_mb("VmRSS")


def peak_rss_mb():
    # VmHWM, not ru_maxrss: after exec, ru_maxrss starts at the parent's peak (Linux carries it over), which would
    # hide this process's own peak whenever the parent's was larger.
    return _proc_status_mb("VmHWM")


def cpu_peak_mb(provider, n, d, dtype):
    """Peak-RSS growth (MB) of forward and of forward+backward, in a fresh interpreter."""
    code = CHILD.format(repo=os.path.join(REPO, "bench"), threads=torch.get_num_threads(), n=n, d=d,
                        dtype=str(dtype).split(".")[-1], provider=provider)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if run.returncode != 0:
        return {"fwd": float("nan"), "fwdbwd": float("nan")}
    return json.loads(run.stdout.strip().splitlines()[-1])


def matmul_tflops(device, dtype):
    """The device's measured dense matmul rate for `dtype` (TFLOP/s)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    else:
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---- header and table ------------------------------------------------------------------------------------------------
def header(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown (no commit)"
    except Exception:
        commit = "unknown"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"# device: {name} | torch {torch.__version__} | triton {triton_version} | commit {commit} | {now}"


def naive_fits(n, d, dtype, device):
    """(fits, reason). Naive keeps ~6 N x M buffers alive in forward+backward (logits, both log-softmaxes and their
    gradients; fp32 ones on CPU)."""
    elem = torch.finfo(dtype).bits // 8 if device.type == "cuda" else 4
    need = 6 * n * n * elem
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * free:
        return False, f"OOM/skipped: needs ~{need / 2**30:.1f} GB of N x M buffers, {free / 2**30:.1f} GB free"
    return True, ""


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4k,16k,64k,256k" if cuda else "1k,4k", help="N = M values, e.g. 4k,16k")
    parser.add_argument("--dims", default="512,1024" if cuda else "256", help="D values")
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=sorted(DTYPES))
    parser.add_argument("--providers", default="naive,chunked,triton,csrc,inf_cl",
                        help=f"comma list of {', '.join(PROVIDERS)}; triton = triton_atomic,triton_gemm")
    parser.add_argument("--gemm-chunk-mb", type=int, default=None,
                        help=f"triton_gemm: memory budget of one G chunk (default "
                             f"{infonce_gemm.GEMM_CHUNK_BYTES >> 20} MB)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no memory subprocesses on CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions on CPU (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gemm_chunk_mb:
        infonce_gemm.GEMM_CHUNK_BYTES = args.gemm_chunk_mb << 20

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    reps = args.reps or (2 if args.quick else 5)
    sizes = [parse_size(x) for x in args.sizes.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    print(header(device))
    peak = matmul_tflops(device, dtype)
    print(f"# measured {args.dtype} matmul rate: {peak:.3f} TFLOP/s ({'8192^3' if cuda else '1024^3'} torch.matmul)")
    print("# FLOP rule: 2*N*M*D per similarity pass; fwd = 1 pass (shared by both directions), "
          "fwd+bwd = 4 passes (fwd 1 + bwd 3: recompute, dq, dp)")
    mem_label = "peak MB above inputs (torch.cuda.max_memory_allocated)" if cuda else \
        "peak-RSS growth MB during the call (clear_refs + VmHWM, fresh subprocess per provider/size)"
    print(f"# memory: {mem_label}")
    print(f"# torch threads: {torch.get_num_threads()}; 'x naive': the naive provider's fwd+bwd ms over this one's")

    print(f"# triton_gemm: G chunks of at most {infonce_gemm.GEMM_CHUNK_BYTES >> 20} MB; 'bwd' = fwd+bwd - fwd")
    providers = []
    names = [n for name in args.providers.split(",") for n in ALIASES.get(name, [name])]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {', '.join(unknown)} (choose from {', '.join(PROVIDERS)}, triton)")
    for name in names:
        if name.startswith("triton") and not cuda:
            print(f"# {name}: skipped (CUDA only here; TRITON_INTERPRET=1 runs it on CPU for tests, not for timing)")
            continue
        if name == "csrc" and (cuda or not native.LOADED):
            print(f"# csrc: skipped ({'CPU only' if cuda else 'extension not built: ' + native.LOAD_ERROR})")
            continue
        if name == "inf_cl":
            fn, why = _inf_cl()
            if fn is None or not cuda:
                print(f"# inf_cl: skipped ({why or 'CUDA only'})")
                continue
        providers.append(name)

    print("\n| N=M | D | provider | fwd ms | fwd TFLOP/s | fwd % peak | fwd MB | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| fwd+bwd % peak | fwd+bwd MB | bwd ms | bwd TFLOP/s | bwd % peak | x naive |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for d in dims:
            q, p, s = make_inputs(n, d, dtype, device)
            flops = 2 * n * n * d
            naive_ms = None
            for name in providers:
                if name == "naive":
                    fits, reason = naive_fits(n, d, dtype, device)
                    if not fits:
                        print(f"| {n} | {d} | {name} | {reason} ||||||||||")
                        continue
                fn = PROVIDERS[name]
                cells = []
                for backward, passes in ((False, 1), (True, 4)):
                    ms = time_ms(fn, q, p, s, backward, reps)
                    tflops = passes * flops / (ms * 1e-3) / 1e12
                    cells.append((ms, tflops, 100 * tflops / peak))
                if cuda:
                    mem = [cuda_peak_mb(fn, q, p, s, b) for b in (False, True)]
                elif args.quick:
                    mem = [float("nan")] * 2
                else:
                    measured = cpu_peak_mb(name, n, d, dtype)
                    mem = [measured["fwd"], measured["fwdbwd"]]
                (f_ms, f_tf, f_pc), (b_ms, b_tf, b_pc) = cells
                bwd_ms = b_ms - f_ms
                bwd_tf = 3 * flops / (bwd_ms * 1e-3) / 1e12 if bwd_ms > 0 else float("nan")
                f_mb, b_mb = ("n/a" if mb != mb else f"{mb:.0f}" for mb in mem)  # NaN: not measured
                naive_ms = b_ms if name == "naive" else naive_ms
                ratio = f"{naive_ms / b_ms:.2f}" if naive_ms else "-"
                print(f"| {n} | {d} | {name} | {f_ms:.1f} | {f_tf:.3f} | {f_pc:.0f}% | {f_mb} | {b_ms:.1f} "
                      f"| {b_tf:.3f} | {b_pc:.0f}% | {b_mb} | {bwd_ms:.1f} | {bwd_tf:.3f} | {100 * bwd_tf / peak:.0f}% "
                      f"| {ratio} |", flush=True)
            del q, p, s
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
