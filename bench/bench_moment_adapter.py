"""The moment adapter's cost (ville/adapter.py): what a moment pass pays for weights of its own.

Providers
  shared      no adapter: windows and queries run through the clip weights (the recipes before the adapter)
  hooks       the adapter as ville builds it: forward hooks add (alpha / r) B A x to each target projection while a
              moment pass runs (r 16, all q/k/v/o and MLP projections, as the tiny stage 3)
  folded      the alternative without hooks: a second copy of the LLM with B A merged into its weights (what a
              merged peft adapter gives), used for the moment passes: no extra compute, one more LLM in memory (and,
              in training, a second LLM to train in full)

Columns: inference ms per window (embed_video(moment=True) at a fixed number of embedding tokens: tower + prefill +
decode + head; median of --repeats, providers alternating), training ms per localisation batch (windows and their
queries, forward + backward of a loss on their embeddings; `hooks` with isolate, which runs the decoder and head on
detached parameters), both relative to `shared`, and the extra weights each keeps (MB, fp32).
CPU: the tiny stage-3 recipe's model (random weights); `--hidden 768 --layers 6` swaps in a Llama decoder of that
size (12 heads, 4 kv heads, MLP 2048).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from dataclasses import replace

import torch

from ville import ViLLE
from ville.config import MomentAdapterCfg, load_section
from ville.model import ModelCfg


def build(args) -> ViLLE:
    overrides = []
    if args.hidden:
        overrides += [f"model.llm.config.hidden_size={args.hidden}",
                      f"model.llm.config.num_hidden_layers={args.layers}", "model.llm.config.num_attention_heads=12",
                      "model.llm.config.num_key_value_heads=4", "model.llm.config.intermediate_size=2048"]
    cfg = load_section("recipes/tiny/stage3.yaml", "model", ModelCfg, overrides)
    torch.manual_seed(0)
    model = ViLLE(cfg).eval()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for p in model.moment_adapter.up.values():
            p.normal_(0, 0.02)
    return model


def folded_twin(model: ViLLE) -> ViLLE:
    twin = ViLLE(replace(model.cfg, moment_adapter=MomentAdapterCfg())).eval()
    twin.load_state_dict(model.state_dict(), strict=False)
    a, layers = model.moment_adapter, dict(twin.llm.named_modules())
    with torch.no_grad():
        for key in a.down:
            layers[key.replace("__", ".")].weight += a.scale * a.up[key] @ a.down[key]
    return twin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=3, help="embedding tokens per window (the tiny demo's mean: 3)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    model = build(args)
    twin = folded_twin(model)
    plain = ViLLE(replace(model.cfg, moment_adapter=MomentAdapterCfg())).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    # (provider, model, moment flag): `shared` is the model without an adapter; `folded` embeds windows as clips of
    # the merged copy (the same numbers as `hooks`, checked below).
    providers = [("shared", plain, True), ("hooks", model, True), ("folded", twin, False)]
    mb = 4 / 2 ** 20
    extra = {"shared": 0.0, "hooks": sum(p.numel() for p in model.moment_adapter.parameters()) * mb,
             "folded": sum(p.numel() for p in twin.llm.parameters()) * mb}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# bench_moment_adapter | CPU x{os.cpu_count()}, {torch.get_num_threads()} threads | torch "
          f"{torch.__version__} | commit {commit} | {time.strftime('%Y-%m-%d %H:%M')} | LLM hidden "
          f"{model.hidden}, {model.base_llm().config.num_hidden_layers} layers | adapter r {model.cfg.moment_adapter.r}"
          f" | {args.tokens} tokens per window")
    print("| windows | provider | infer ms / window | vs shared | train ms / batch | vs shared | extra weights MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    size = model.vision.input_size
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        frames = torch.randint(0, 256, (B, model.cfg.vision.max_frames, size[0], size[1], 3), dtype=torch.uint8,
                               generator=g)
        texts = [f"the red circle number {i} moves left" for i in range(B)]
        with torch.no_grad():
            ref = model.embed_video(frames, num_tokens=args.tokens, moment=True).embeddings
            torch.testing.assert_close(twin.embed_video(frames, num_tokens=args.tokens).embeddings, ref,
                                       rtol=1e-4, atol=1e-5)
        infer: dict[str, list[float]] = {p[0]: [] for p in providers}
        train: dict[str, list[float]] = {p[0]: [] for p in providers}
        for r in range(args.repeats + 1):  # repeat 0 warms up
            for name, m, moment in providers[r % 3:] + providers[: r % 3]:
                t = time.perf_counter()
                with torch.no_grad():
                    m.embed_video(frames, num_tokens=args.tokens, moment=moment)
                t1 = time.perf_counter()
                m.train()
                loss = m.video_embed_steps(frames, k=args.tokens, moment=moment).per_step.sum() + \
                    m.text_embed_train(texts, moment=moment).sum()
                loss.backward()
                m.zero_grad(set_to_none=True)
                m.eval()
                t2 = time.perf_counter()
                if r:
                    infer[name].append(1000 * (t1 - t) / B)
                    train[name].append(1000 * (t2 - t1))
        base_i, base_t = statistics.median(infer["shared"]), statistics.median(train["shared"])
        for name, _, _ in providers:
            i, t = statistics.median(infer[name]), statistics.median(train[name])
            print(f"| {B} | {name} | {i:.3f} | {i / base_i:.2f}x | {t:.1f} | {t / base_t:.2f}x | {extra[name]:.2f} |")


if __name__ == "__main__":
    main()
