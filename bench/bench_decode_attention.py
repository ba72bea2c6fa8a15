"""Kernel-level benchmark of decode_attention: one new token per active sample over per-sample KV caches.

    python bench/bench_decode_attention.py [--quick] [--dtype bf16|fp16|fp32]

Providers side by side: `ref` (decode_attention_ref in the input dtype: gathered caches, materialised masked scores),
`torch` (the op's torch path, VILLE_KERNELS=torch), `triton` (CUDA only) and `flash_attn` (flash_attn_with_kvcache
with cache_seqlens / cache_batch_idx, when importable). Per call: ms (triton.testing.do_bench median on CUDA,
median of timed runs on CPU), GB/s of bytes that must move (K/V over the valid lengths of the active rows, q, out),
that as % of the device's copy bandwidth measured here (a large device-to-device copy, read + write), and the peak
memory the call allocates beyond its inputs (CUDA allocator stats; on CPU the process's peak RSS growth, with
glibc's mmap threshold pinned so freed tensors leave RSS).

Workload (GPU): batch {16, 256} x cache length {1k, 3k} (lengths per sample uniform in [L/2, L]) for Gemma-2-2B
(Hq 8, Hkv 4, Dh 256, softcap 50) and Llama-like (Hq 32, Hkv 8, Dh 128 / 64) heads, plus "half" rows where only a
random half of the cache rows is active through batch_idx. On CPU: fp32, batch {4, 16} x length {256, 1024}.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import re
import statistics
import subprocess
import time

import torch

from ville_kernels.decode_attention import decode_attention, decode_attention_ref

try:
    import triton
    import triton.testing
except Exception:
    triton = None
try:
    from flash_attn import flash_attn_with_kvcache
except Exception:
    flash_attn_with_kvcache = None

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {  # name: (Hq, Hkv, Dh, softcap)
    "gemma2-2b": (8, 4, 256, 50.0),
    "llama-d128": (32, 8, 128, None),
    "llama-d64": (32, 8, 64, None),
}


def header(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except Exception:
        commit = "no-commit"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        m = re.search(r"model name\s*:\s*(.*)", cpuinfo)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        name = (f"CPU {m.group(1) if m else platform.processor()} ({torch.get_num_threads()} threads, "
                f"load avg {load:.1f})")
    return (f"# decode_attention | device {name} | torch {torch.__version__} | "
            f"triton {triton.__version__ if triton else 'n/a'} | commit {commit} | "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}")


def _rss(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_bytes(fn, device):
    """Memory the call allocates beyond what is already live (its output included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak RSS
    except OSError:
        return float("nan")
    base = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - base


def time_ms(fn, device, quick):
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")
    fn()
    times, budget, start = [], (0.3 if quick else 1.0), time.perf_counter()
    while len(times) < 3 or (len(times) < 10 and time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def copy_bandwidth(device, quick):
    """Read + write bytes per second of a large same-device copy: the practical ceiling for a streaming kernel."""
    n = (1 << 28 if device.type == "cuda" else 1 << 26) // (2 if quick else 1)  # fp32 elements: 1 GiB / 256 MiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_case(batch, length, hq, hkv, dh, dtype, device, active, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(active, hq, dh, generator=g).to(device, dtype)
    k = torch.randn(batch, hkv, length, dh, generator=g).to(device, dtype)
    v = torch.randn(batch, hkv, length, dh, generator=g).to(device, dtype)
    lens = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lens[0] = length
    rows = None if active == batch else torch.randperm(batch, generator=g)[:active].sort().values
    if rows is not None:
        lens[rows[0]] = length
    return q, k, v, lens.to(device, torch.int32), (rows.to(device) if rows is not None else None)


def providers(device, q, k, v, lens, rows, softcap):
    out = {"ref": lambda: decode_attention_ref(q, k, v, lens, rows, softcap=softcap, upcast=False)}

    def torch_path():
        old = os.environ.get("VILLE_KERNELS")
        os.environ["VILLE_KERNELS"] = "torch"
        try:
            return decode_attention(q, k, v, lens, rows, softcap=softcap)
        finally:
            os.environ.pop("VILLE_KERNELS") if old is None else os.environ.__setitem__("VILLE_KERNELS", old)

    out["torch"] = torch_path
    if device.type == "cuda" and triton is not None and os.environ.get("VILLE_KERNELS") != "torch":
        out["triton"] = lambda: decode_attention(q, k, v, lens, rows, softcap=softcap)
    if device.type == "cuda" and flash_attn_with_kvcache is not None:
        kf = k.transpose(1, 2).contiguous()  # flash-attn keeps caches as (B_cache, L, Hkv, Dh)
        vf = v.transpose(1, 2).contiguous()
        idx = rows.int() if rows is not None else None
        seqlens = (lens[rows] if rows is not None else lens).int()  # flash-attn indexes lengths by query, not row
        out["flash_attn"] = lambda: flash_attn_with_kvcache(
            q[:, None], kf, vf, cache_seqlens=seqlens, cache_batch_idx=idx, softmax_scale=q.shape[-1] ** -0.5,
            softcap=softcap or 0.0)[:, 0]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        try:  # M_MMAP_THRESHOLD pinned: big buffers are mmap'd, so freeing one leaves RSS (glibc only)
            ctypes.CDLL(None).mallopt(-3, 128 * 1024)
        except (OSError, AttributeError):
            pass
        batches, lengths, models = (4, 16), (256, 1024), ["gemma2-2b", "llama-d128"]
    else:
        batches, lengths, models = (16, 256), (1024, 3072), list(MODELS)
    if args.quick:
        batches, lengths, models = batches, lengths[-1:], models[:1]

    print(header(device))
    bw = copy_bandwidth(device, args.quick)
    print(f"# measured copy bandwidth {bw / 1e9:.1f} GB/s; dtype {str(dtype).replace('torch.', '')}; "
          f"flash_attn {'yes' if flash_attn_with_kvcache else 'not installed'}"
          + ("; triton kernel: CUDA only" if device.type == "cpu" else ""))
    cols = (f"{'model':<11} {'B':>4} {'act':>4} {'L':>5} {'provider':<10} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
            f"{'peakMB':>8}")
    print(cols)
    print("-" * len(cols))
    for model in models:
        hq, hkv, dh, softcap = MODELS[model]
        for batch in batches:
            for length in lengths:
                for active in (batch, batch // 2):
                    q, k, v, lens, rows = make_case(batch, length, hq, hkv, dh, dtype, device, active)
                    used = lens[rows] if rows is not None else lens
                    nbytes = (2 * int(used.sum()) * hkv * dh + 2 * active * hq * dh) * k.element_size()
                    for name, fn in providers(device, q, k, v, lens, rows, softcap).items():
                        ms = time_ms(fn, device, args.quick)
                        peak = peak_bytes(fn, device)
                        gbs = nbytes / (ms * 1e-3) / 1e9
                        print(f"{model:<11} {batch:>4} {active:>4} {length:>5} {name:<10} {ms:>9.3f} {gbs:>8.1f} "
                              f"{100 * gbs * 1e9 / bw:>5.1f}% {peak / 2**20:>8.1f}", flush=True)
                    del q, k, v, lens, rows


if __name__ == "__main__":
    with torch.inference_mode():
        main()
