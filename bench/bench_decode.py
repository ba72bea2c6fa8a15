"""End-to-end adaptive embedding decode: pad-fill vs compacting loops (issue 4's workload).

Providers
  padfill         every row keeps decoding until the whole batch has stopped (Hugging Face generate()'s behaviour)
  compact-torch   finished samples leave the batch; attention through ville_kernels' torch path
  compact-triton  the same loop with the Triton decode-attention kernel reading caches through batch_idx (CUDA)

Stop steps are forced per sample (`_stop_schedule`), from three distributions: all at 1, mixed (mean ~5), all at max.
Columns: videos/s end to end (prefill + decode + head), decode ms per step (mean over the decode loop), attention ms
per step (the decode-attention calls alone, timed in a second pass with synchronisation), attention GB/s (K/V bytes
of the valid cache rows read, all layers) and % of the measured device copy bandwidth, and speed-up over pad-fill.
GPU: the real-scale recipe's decoder (Gemma-2-2B shape, random weights, bf16), batch {16, 256}, prefix {1k, 3k}.
CPU: the tiny model, batch {4, 16}, prefix ~{128, 512}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

import ville_kernels
from ville import ViLLE
from ville.config import load_section
from ville.model import ModelCfg, _DecodeSession


def header(device: torch.device) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    import triton

    return (f"# bench_decode | device {name} | torch {torch.__version__} | triton {triton.__version__} | "
            f"commit {commit} | {time.strftime('%Y-%m-%d %H:%M')}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / min(times) / 1e9  # read + write


def schedules(batch: int, kmax: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # mixed: geometric-like with mean ~5, clipped to [1, kmax]
    mixed = torch.distributions.Geometric(torch.tensor(0.2)).sample((batch,)).long() + 1
    return {"all@1": torch.ones(batch, dtype=torch.long), "mixed": mixed.clamp(1, kmax),
            f"all@{kmax}": torch.full((batch,), kmax, dtype=torch.long)}


def run_once(model, frames, schedule, device) -> tuple[float, float, int]:
    """-> (total s, decode s, decode steps)."""
    steps = {"n": 0, "t": 0.0}
    orig = _DecodeSession.step

    def timed(self, x):
        sync(device)
        t = time.perf_counter()
        out = orig(self, x)
        sync(device)
        steps["t"] += time.perf_counter() - t
        steps["n"] += 1
        return out

    _DecodeSession.step = timed
    try:
        sync(device)
        t0 = time.perf_counter()
        model.embed_video(frames, _stop_schedule=schedule)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        _DecodeSession.step = orig
    return total, steps["t"], steps["n"]


def attention_pass(model, frames, schedule, device) -> tuple[float, float]:
    """Time the decode-attention calls alone -> (seconds, K/V bytes read)."""
    acc = {"t": 0.0, "bytes": 0}
    orig = ville_kernels.decode_attention

    def timed(q, k, v, lens, batch_idx=None, **kw):
        sync(device)
        t = time.perf_counter()
        out = orig(q, k, v, lens, batch_idx=batch_idx, **kw)
        sync(device)
        acc["t"] += time.perf_counter() - t
        rows = batch_idx if batch_idx is not None else torch.arange(q.shape[0], device=q.device)
        acc["bytes"] += int(lens[rows].sum()) * k.shape[1] * k.shape[3] * k.element_size() * 2
        return out

    ville_kernels.decode_attention = timed
    try:
        model.embed_video(frames, _stop_schedule=schedule)
    finally:
        ville_kernels.decode_attention = orig
    return acc["t"], acc["bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        cfg = load_section("recipes/stage3.yaml", "model", ModelCfg, [
            "model.vision.pretrained=false", "model.llm.pretrained=false", "model.llm.tokenizer=builtin",
            "model.llm.lora.enabled=false"])
        batches, frame_counts = ([16, 256], [4, 12]) if not args.quick else ([16], [4])
    else:
        cfg = load_section("recipes/tiny/stage3.yaml", "model", ModelCfg, ["model.llm.lora.enabled=false"])
        batches, frame_counts = ([4, 16], [2, 8]) if not args.quick else ([4], [2])
    cfg.embed.max_embed_tokens = 16
    model = ViLLE(cfg).to(device).eval()
    kmax = cfg.embed.max_embed_tokens
    bw = copy_bandwidth(device)
    print(header(device))
    print(f"# model: {cfg.llm.config.get('model_type')} hidden {model.hidden}, layers "
          f"{model.base_llm().config.num_hidden_layers}; {model.vision.tokens_per_frame} video tokens/frame; "
          f"max {kmax} steps; measured copy bandwidth {bw:.1f} GB/s")
    cols = ["batch", "prefix", "stops", "mean", "provider", "videos/s", "decode ms/step", "attn ms/step", "attn GB/s",
            "%copy", "speed-up"]
    print(" | ".join(cols))
    gen = torch.Generator().manual_seed(0)
    providers = ["padfill", "compact-torch"] + (["compact-triton"] if device.type == "cuda" else [])
    for b in batches:
        for t in frame_counts:
            frames = torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, generator=gen)
            prefix = t * model.vision.tokens_per_frame + 10
            for name, sched in schedules(b, kmax, gen).items():
                base = None
                for prov in providers:
                    model.cfg.compact_every = 10**9 if prov == "padfill" else 1
                    os.environ["VILLE_KERNELS"] = "" if prov == "compact-triton" else "torch"
                    run_once(model, frames, sched, device)  # warm-up
                    runs = [run_once(model, frames, sched, device) for _ in range(args.repeats)]
                    total = statistics.median(r[0] for r in runs)
                    dec = statistics.median(r[1] / max(1, r[2]) for r in runs)
                    nsteps = runs[0][2]
                    attn_s, nbytes = attention_pass(model, frames, sched, device)
                    vps = b / total
                    base = base or vps
                    print(" | ".join(str(x) for x in [
                        b, prefix, name, f"{sched.float().mean():.1f}", prov, f"{vps:.1f}", f"{dec * 1e3:.2f}",
                        f"{attn_s / max(1, nsteps) * 1e3:.3f}", f"{nbytes / max(attn_s, 1e-9) / 1e9:.1f}",
                        f"{100 * nbytes / max(attn_s, 1e-9) / 1e9 / bw:.1f}%", f"{vps / base:.2f}x"]))
    os.environ.pop("VILLE_KERNELS", None)
    print("# target (H100): compact speed-up on 'mixed' >= 0.8 x max/mean steps; attention >= 70% of copy bandwidth")
    print(f"# peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else
          "# peak memory: not tracked on CPU")


if __name__ == "__main__":
    with torch.no_grad():
        main()
