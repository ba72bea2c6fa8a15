"""End-to-end adaptive embedding decode: pad-fill vs compacting loops (issue 4's workload).

Providers
  padfill         every row keeps decoding until the last sample of the batch has stopped, then the loop ends
                  (Hugging Face generate()'s behaviour: it checks "all finished" after every step). The model's own
                  loop with compaction switched off (`_DecodeSession.keep` keeps every row) and one step per
                  forward (`chunk_tokens` 1), as generate() decodes.
  compact-torch   finished samples leave the batch; attention through ville_kernels' torch path
  compact-triton  the same loop with the Triton decode-attention kernel reading caches through batch_idx (CUDA)
  compact-history compact-torch planning from earlier calls' stop steps (`ViLLE._stop_history`), seeded with the
                  schedule's own stops: the steady state of a model embedding more batches of the same data. The
                  other providers run with an empty history (they plan from the stop rate seen within the call).

Stop steps are forced per sample (`_stop_schedule`): all at 1, short (uniform in 1..4), mixed (geometric, mean ~5),
all at max. Columns: videos/s end to end (tower + prefill + decode + head); loop ms (the decode loop alone: from the
end of the prefill to the embedding head; median of --repeats, providers alternating); decoder forwards the loop ran
(fewer than steps when several steps share a forward, `_DecodeSession.chunk_tokens`) and loop ms per step of the
batch (max stop step); attention ms per forward (the decode-attention calls alone, timed in a second pass with
synchronisation), attention GB/s (K/V bytes of the valid cache rows read, all layers) and % of the measured device
copy bandwidth; speed-up of the loop over
pad-fill, the ideal speed-up max/mean steps (pad-fill decodes B x max steps, compaction sum_b n_b) and achieved /
ideal (target >= 0.8).
GPU: the real-scale recipe's decoder (Gemma-2-2B shape, random weights, bf16), batch {16, 256}, prefix {1k, 3k}.
CPU: the tiny model, batch {4, 16}, prefix ~{128, 512}; `--hidden 768 --layers 6 --batches 32` swaps in a Llama
decoder of that size (12 heads, 4 kv heads, MLP 2048; random weights).
"""
from __future__ import annotations

import argparse
import contextlib
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
    # mixed: geometric with mean ~5, clipped to [1, kmax]; the generator makes every provider see the same stops
    mixed = torch.empty(batch).geometric_(0.2, generator=gen).long()
    return {"all@1": torch.ones(batch, dtype=torch.long),
            "short": torch.randint(1, min(4, kmax) + 1, (batch,), generator=gen),
            "mixed": mixed.clamp(1, kmax),
            f"all@{kmax}": torch.full((batch,), kmax, dtype=torch.long)}


def _keep_all(self, keep):
    """Pad-fill: finished rows stay in the batch (the loop still stops once every sample has)."""


class _padfill_mode:
    """Within: the model's loop as Hugging Face generate() runs it, one token per forward and no compaction."""

    def __enter__(self):
        self.saved = _DecodeSession.keep, _DecodeSession.chunk_tokens
        _DecodeSession.keep, _DecodeSession.chunk_tokens = _keep_all, 1

    def __exit__(self, *exc):
        _DecodeSession.keep, _DecodeSession.chunk_tokens = self.saved


def seed_history(model, provider: str, schedule: torch.Tensor) -> None:
    """compact-history: the model has seen these stops before; every other provider: it has seen none."""
    model._stop_history.clear()
    if provider == "compact-history":
        K = model.cfg.embed.max_embed_tokens
        counts = torch.bincount(schedule.cpu(), minlength=K + 1)[: K + 1]
        model._stop_history[(K, model.cfg.embed.min_embed_tokens)] = [float(c) for c in counts.tolist()]


def run_once(model, frames, schedule, device, padfill: bool) -> tuple[float, float, int]:
    """-> (total s, decode-loop s, decode steps). The loop runs from the end of the prefill (_DecodeSession's
    constructor) to the embedding head's first call."""
    marks = {"steps": 0}
    init, step = _DecodeSession.__init__, _DecodeSession.step

    def timed_init(self, *args, **kw):
        init(self, *args, **kw)
        sync(device)
        marks["loop"] = time.perf_counter()

    def counted_step(self, x):
        marks["steps"] += 1
        return step(self, x)

    def head_start(module, inputs):
        sync(device)
        marks["head"] = time.perf_counter()

    hook = model.head.register_forward_pre_hook(head_start)
    _DecodeSession.__init__, _DecodeSession.step = timed_init, counted_step
    try:
        with _padfill_mode() if padfill else contextlib.nullcontext():
            sync(device)
            t0 = time.perf_counter()
            model.embed_video(frames, _stop_schedule=schedule)
            sync(device)
            total = time.perf_counter() - t0
    finally:
        _DecodeSession.__init__, _DecodeSession.step = init, step
        hook.remove()
    return total, marks["head"] - marks["loop"], marks["steps"]


def attention_pass(model, frames, schedule, device, padfill: bool) -> tuple[float, float]:
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
        with _padfill_mode() if padfill else contextlib.nullcontext():
            model.embed_video(frames, _stop_schedule=schedule)
    finally:
        ville_kernels.decode_attention = orig
    return acc["t"], acc["bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int,
                    help="CPU: a Llama decoder of this width (64-dim heads) instead of the tiny one")
    ap.add_argument("--layers", type=int, default=6, help="with --hidden: decoder layers")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: by device)")
    ap.add_argument("--frames", type=int, nargs="+", help="frames per clip (default: by device)")
    ap.add_argument("--kmax", type=int, default=16, help="max embedding steps")
    ap.add_argument("--chunk-tokens", type=int, help="_DecodeSession.chunk_tokens (1: one step per forward)")
    args = ap.parse_args()
    if args.chunk_tokens:
        _DecodeSession.chunk_tokens = args.chunk_tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        cfg = load_section("recipes/stage3.yaml", "model", ModelCfg, [
            "model.vision.pretrained=false", "model.llm.pretrained=false", "model.llm.tokenizer=builtin",
            "model.llm.lora.enabled=false"])
        batches, frame_counts = ([16, 256], [4, 12]) if not args.quick else ([16], [4])
    else:
        overrides = ["model.llm.lora.enabled=false"]
        if args.hidden:
            heads = args.hidden // 64
            overrides += [f"model.llm.config.hidden_size={args.hidden}",
                          f"model.llm.config.num_hidden_layers={args.layers}",
                          f"model.llm.config.num_attention_heads={heads}",
                          f"model.llm.config.num_key_value_heads={max(1, heads // 3)}",
                          "model.llm.config.intermediate_size=2048"]
        cfg = load_section("recipes/tiny/stage3.yaml", "model", ModelCfg, overrides)
        batches, frame_counts = ([4, 16], [2, 8]) if not args.quick else ([4], [2])
    batches, frame_counts = args.batches or batches, args.frames or frame_counts
    cfg.embed.max_embed_tokens = args.kmax
    model = ViLLE(cfg).to(device).eval()
    kmax = cfg.embed.max_embed_tokens
    bw = copy_bandwidth(device)
    print(header(device))
    print(f"# model: {cfg.llm.config.get('model_type')} hidden {model.hidden}, layers "
          f"{model.base_llm().config.num_hidden_layers}; {model.vision.tokens_per_frame} video tokens/frame; "
          f"max {kmax} steps; chunk_tokens {_DecodeSession.chunk_tokens}; {torch.get_num_threads()} torch threads; "
          f"measured copy bandwidth {bw:.1f} GB/s")
    cols = ["batch", "prefix", "stops", "mean", "max", "provider", "videos/s", "loop ms", "forwards", "ms/step",
            "attn ms/fwd", "attn GB/s", "%copy", "loop speed-up", "ideal", "achieved/ideal"]
    print(" | ".join(cols))
    gen = torch.Generator().manual_seed(0)
    providers = ["padfill", "compact-torch", "compact-history"] + (["compact-triton"] if device.type == "cuda" else [])
    for b in batches:
        for t in frame_counts:
            frames = torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, generator=gen)
            prefix = t * model.vision.tokens_per_frame + 10
            for name, sched in schedules(b, kmax, gen).items():
                base = None
                ideal = sched.max().item() / sched.float().mean().item()
                runs = {prov: [] for prov in providers}

                def once(prov, record=True):
                    model.cfg.compact_every = 1
                    os.environ["VILLE_KERNELS"] = "" if prov == "compact-triton" else "torch"
                    seed_history(model, prov, sched)
                    result = run_once(model, frames, sched, device, prov == "padfill")
                    if record:
                        runs[prov].append(result)

                for prov in providers:
                    once(prov, record=False)  # warm-up
                # Providers alternate within each repeat, so a machine whose load drifts (shared CPUs) biases none.
                for _ in range(args.repeats):
                    for prov in providers:
                        once(prov)
                for prov in providers:
                    padfill = prov == "padfill"
                    os.environ["VILLE_KERNELS"] = "" if prov == "compact-triton" else "torch"
                    total = statistics.median(r[0] for r in runs[prov])
                    loop = statistics.median(r[1] for r in runs[prov])
                    forwards = runs[prov][0][2]
                    seed_history(model, prov, sched)
                    attn_s, nbytes = attention_pass(model, frames, sched, device, padfill)
                    base = base or loop
                    achieved = base / loop
                    steps = sched.max().item()
                    print(" | ".join(str(x) for x in [
                        b, prefix, name, f"{sched.float().mean():.1f}", steps, prov, f"{b / total:.1f}",
                        f"{loop * 1e3:.1f}", forwards, f"{loop / steps * 1e3:.2f}",
                        f"{attn_s / forwards * 1e3:.3f}", f"{nbytes / max(attn_s, 1e-9) / 1e9:.1f}",
                        f"{100 * nbytes / max(attn_s, 1e-9) / 1e9 / bw:.1f}%", f"{achieved:.2f}x", f"{ideal:.2f}x",
                        "-" if padfill else f"{achieved / ideal:.2f}"]), flush=True)
    os.environ.pop("VILLE_KERNELS", None)
    print("# target: achieved/ideal >= 0.8 for every schedule; (H100) attention >= 70% of copy bandwidth")
    print(f"# peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else
          "# peak memory: not tracked on CPU")


if __name__ == "__main__":
    with torch.no_grad():
        main()
