"""Attribute binding: does the model tell "a red circle near a blue square" from "a blue circle near a red square"?

Reads `<data_dir>/binding/shard-*.tar` (written by `python -m data_tools.binding`; independent of the evaluated
split): pairs of clips a / b with identical scenes except that two objects' colours are swapped, and captions that
differ only by those two colour words. Each pair gives two text-to-video trials (caption a must score clip a above
clip b; caption b must score b above a) and two video-to-text trials (clip a must score caption a above caption b;
the same for b). Scores are cosines of L2-normalised embeddings; a tie counts as wrong. Chance is 50 % per trial;
if the pair's four scores were exchangeable, all four trials would hold with probability 4/24 (the two matched scores
are the top two of four).
"""
from __future__ import annotations

import os

import torch

from .common import Cache, list_clips, rank_world, single_caption, split_shards, text_embeddings, video_embeddings
from .config import EvalCfg

FOLDER = "binding"
CHANCE = {"t2v": 50.0, "v2t": 50.0, "pair_both": round(100 * 4 / 24, 2)}


def binding_pairs(clips: list[tuple[str, dict]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """((key a, caption a), (key b, caption b)) per pair, in pair-id order; a pair without both sides, a side
    without a caption or two identical captions is a broken folder and fails naming the pair."""
    sides: dict[int, dict[str, tuple[str, str]]] = {}
    for key, meta in clips:
        pair, side = meta.get("binding_pair"), meta.get("binding_side")
        if not isinstance(pair, int) or side not in ("a", "b"):
            raise ValueError(f"binding clip {key!r}: expected int `binding_pair` and `binding_side` 'a'/'b', got "
                             f"{pair!r} / {side!r}")
        if side in sides.setdefault(pair, {}):
            raise ValueError(f"binding pair {pair}: two clips on side {side!r} ({sides[pair][side][0]!r}, {key!r})")
        sides[pair][side] = (key, single_caption(meta))
    out = []
    for pair in sorted(sides):
        if set(sides[pair]) != {"a", "b"}:
            raise ValueError(f"binding pair {pair}: only side {sorted(sides[pair])} present")
        a, b = sides[pair]["a"], sides[pair]["b"]
        if not a[1] or not b[1] or a[1] == b[1]:
            raise ValueError(f"binding pair {pair}: the two sides need two different captions, got {a[1]!r} and "
                             f"{b[1]!r}")
        out.append((a, b))
    return out


def trial_accuracy(aa: torch.Tensor, ab: torch.Tensor, ba: torch.Tensor, bb: torch.Tensor) -> dict:
    """t2v, v2t and pair_both (%) from the (P,) scores of P pairs; `ab` = score(caption a, clip b), and so on."""
    t2v = torch.stack([aa > ab, bb > ba], 1)  # each caption against the two clips; strict: a tie is wrong
    v2t = torch.stack([aa > ba, bb > ab], 1)  # each clip against the two captions

    def pct(x):
        return round(100.0 * float(x.double().mean()), 2)

    return {"t2v": pct(t2v), "v2t": pct(v2t), "pair_both": pct(torch.cat([t2v, v2t], 1).all(1))}


def binding_scores(text_a: torch.Tensor, text_b: torch.Tensor, video_a: torch.Tensor, video_b: torch.Tensor
                   ) -> dict:
    """The metrics from the four (P, D) embedding stacks of P pairs (normalised here, in float64)."""
    ta, tb, va, vb = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (text_a, text_b, video_a, video_b))

    def cos(x, y):
        return (x * y).sum(-1)

    aa, ab, ba, bb = cos(ta, va), cos(ta, vb), cos(tb, va), cos(tb, vb)  # caption side, clip side
    return {**trial_accuracy(aa, ab, ba, bb), "video_pair_cosine": round(float(cos(va, vb).mean()), 4),
            "caption_pair_cosine": round(float(cos(ta, tb).mean()), 4),
            "matched_cosine": round(float(torch.cat([aa, bb]).mean()), 4),
            "swapped_cosine": round(float(torch.cat([ab, ba]).mean()), 4)}


def binding(model, data_dir: str, cache: Cache, cfg: EvalCfg) -> dict:
    if not os.path.isdir(os.path.join(data_dir, FOLDER)):
        return {"protocol": f"not available: {data_dir} has no {FOLDER}/ folder (python -m data_tools.binding --out "
                            f"{os.path.join(data_dir, FOLDER)})", "num_pairs": 0}
    shards = split_shards(data_dir, FOLDER)
    pairs = binding_pairs(list_clips(shards))[: cfg.max_clips]
    clips = [(side[0], {}) for pair in pairs for side in pair]
    name = f"{FOLDER}-{cfg.num_frames}-videos-{cfg.frame_size}px"
    videos, _ = video_embeddings(model, shards, clips, cache, name, cfg)
    temb = text_embeddings(model, [side[1] for pair in pairs for side in pair], cache, cfg)
    if rank_world()[0] != 0:
        return {}

    def stack(side: int, what: str) -> torch.Tensor:
        return torch.stack([videos[p[side][0]]["emb"] if what == "video" else temb[p[side][1]] for p in pairs])

    res = binding_scores(stack(0, "text"), stack(1, "text"), stack(0, "video"), stack(1, "video"))
    return {"protocol": f"zero-shot; {len(pairs)} pairs of clips from {FOLDER}/ (not a benchmark split) identical but "
                        f"for two objects' swapped colours, captions differing only by those two colour words; t2v: "
                        f"each caption must score its own clip above the swapped one, v2t: each clip must score its "
                        f"own caption above the swapped one (2 trials per pair and direction, % correct, ties wrong); "
                        f"pair_both: % of pairs with all 4 trials right; *_cosine: mean cosines (video_pair / "
                        f"caption_pair: between the two sides; matched: caption with its clip; swapped: with the "
                        f"other clip)",
            "num_pairs": len(pairs), **res, "chance": dict(CHANCE)}
