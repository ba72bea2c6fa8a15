"""Attribute-binding pairs: two clips that differ only in which of two objects wears which colour.

    python -m data_tools.binding --out data/synth/binding --seed 0 --num-pairs 100 [--pairs-per-shard 500]

Pair p is clip `binding-{p:07d}-a` (shape s1 in colour c1, shape s2 in c2) and clip `binding-{p:07d}-b` (s1 in c2,
s2 in c1); positions, sizes, background, events, clip length and `text_seed` are the same, so the two captions differ
only by the two swapped colour words and the two videos only where the two objects are. A model that embeds a scene
as a bag of attributes ("red", "blue", "circle", "square") cannot tell them apart; one that binds each colour to its
object can. `ville.eval`'s `binding` task scores it.

Clips are written in exactly the format of the synthetic benchmark's splits (`data_tools.synth.clip_json`, its
`describe` for the wording, its renderer and encoder), with two more JSON keys: `binding_pair` (int, the pair id)
and `binding_side` ("a" or "b"); the split name is `binding`. Scenes have two objects, no colour-change event (the
caption's colours then name the whole clip) and no held-out shape x colour pair in either clip, so the check measures
binding, not compositional generalisation. Each pair is drawn from its own generator
`np.random.default_rng([seed, 100, pair])`; the synthetic splits use namespaces 0-4, so no pair repeats a train, val
or test clip, and the output does not depend on the shard size. Same seed -> byte-identical shards and meta.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from data_tools.render import pair_held_out, render, sample_spec, spec_valid
from data_tools.shards import brace_pattern, encode_mp4, shard_name, write_tar
from data_tools.synth import SPLIT_IDS, clip_json, train_pair_ok

NAMESPACE = 100  # the generators' second seed word; data_tools.synth's splits use SPLIT_IDS (0-4)
assert NAMESPACE not in SPLIT_IDS.values()
SPLIT = "binding"
MAX_TRIES = 10_000  # draws per pair; about one in seven is a 2-object scene without a colour change


def swap_colours(spec: dict, i: int, j: int) -> dict:
    """spec with the colours of objects i and j exchanged (nothing else changes, the input is not mutated)."""
    objects = [dict(o) for o in spec["objects"]]
    objects[i]["colour"], objects[j]["colour"] = spec["objects"][j]["colour"], spec["objects"][i]["colour"]
    return {**spec, "objects": objects}


def _usable(spec: dict) -> bool:
    objects = spec["objects"]
    return (len(objects) == 2 and not any(ev["type"] == "change" for ev in spec["events"])
            and not any(pair_held_out(o["shape"], c) for o in objects for c in (objects[0]["colour"],
                                                                                objects[1]["colour"])))


def pair_specs(seed: int, pair: int, *, size: int = 64, fps: int = 8, max_events: int = 4, min_seconds: float = 3.0,
               max_seconds: float = 8.0) -> tuple[dict, dict]:
    """The two specs of pair `pair`: scenes are drawn from the pair's own generator until one qualifies."""
    rng = np.random.default_rng([seed, NAMESPACE, pair])
    for _ in range(MAX_TRIES):
        spec = sample_spec(rng, size=size, fps=fps, max_events=max_events, pair_ok=train_pair_ok,
                           min_seconds=min_seconds, max_seconds=max_seconds)
        if _usable(spec):
            other = swap_colours(spec, 0, 1)
            if spec_valid(spec) and spec_valid(other):
                return spec, other
    raise RuntimeError(f"binding pair {pair}: no 2-object scene without a colour change in {MAX_TRIES} draws "
                       f"(max_events={max_events})")


def pair_samples(seed: int, pair: int, **kwargs) -> list[dict]:
    """The pair's two shard samples (`__key__`, `mp4`, `json`), side a first."""
    out = []
    for side, spec in zip("ab", pair_specs(seed, pair, **kwargs)):
        key = f"{SPLIT}-{pair:07d}-{side}"
        meta = clip_json(spec, key, SPLIT)
        meta.update(binding_pair=pair, binding_side=side)
        out.append({"__key__": key, "mp4": encode_mp4(render(spec), spec["fps"]), "json": meta})
    return out


def generate(out: str | os.PathLike, *, seed: int = 0, num_pairs: int = 100, pairs_per_shard: int = 500,
             size: int = 64, fps: int = 8, max_events: int = 4, min_seconds: float = 3.0,
             max_seconds: float = 8.0) -> dict:
    """Write `out/shard-*.tar` (a pair never straddles two shards) and `out/meta.json`; returns the meta dict."""
    if num_pairs < 1 or pairs_per_shard < 1:
        raise ValueError(f"--num-pairs and --pairs-per-shard must be >= 1, got {num_pairs} and {pairs_per_shard}")
    if size % 2:
        raise ValueError(f"--size must be even (yuv420p), got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar*"):  # a stale shard from an earlier, larger run would join the pattern
        old.unlink()
    kwargs = dict(size=size, fps=fps, max_events=max_events, min_seconds=min_seconds, max_seconds=max_seconds)
    num_shards = (num_pairs + pairs_per_shard - 1) // pairs_per_shard
    swaps: dict[str, int] = {}
    for shard in range(num_shards):
        samples = []
        for pair in range(shard * pairs_per_shard, min(num_pairs, (shard + 1) * pairs_per_shard)):
            samples += pair_samples(seed, pair, **kwargs)
            colours = sorted(o["colour"] for o in samples[-1]["json"]["objects"])
            swaps["/".join(colours)] = swaps.get("/".join(colours), 0) + 1
        write_tar(out / shard_name("shard", shard), samples)
    meta = {"format": "ville-binding-v1", "seed": seed, "generator": f"np.random.default_rng([seed, {NAMESPACE}, "
            f"pair])", "num_pairs": num_pairs, "num_clips": 2 * num_pairs, **kwargs,
            "shards": brace_pattern("", "shard", num_shards),  # relative to this folder, so it moves with it
            "json_keys": {"binding_pair": "int, the pair id", "binding_side": "'a' or 'b'; side b is side a with the "
                          "two objects' colours swapped"},
            "swapped_colour_pairs": dict(sorted(swaps.items()))}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_tools.binding", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (shard-*.tar, meta.json), e.g. data/synth/binding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-pairs", type=int, default=100)
    p.add_argument("--pairs-per-shard", type=int, default=500)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even); match the benchmark's")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--max-events", type=int, default=4)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=8.0)
    a = p.parse_args(argv)
    meta = generate(a.out, seed=a.seed, num_pairs=a.num_pairs, pairs_per_shard=a.pairs_per_shard, size=a.size,
                    fps=a.fps, max_events=a.max_events, min_seconds=a.min_seconds, max_seconds=a.max_seconds)
    print(json.dumps({k: meta[k] for k in ("num_pairs", "shards")}))
    return meta


if __name__ == "__main__":
    main()
