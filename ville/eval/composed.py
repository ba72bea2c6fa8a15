"""Composed video retrieval and long-text retrieval.

`composed`: zero-shot; query = embed_composed(source video, edit text), gallery = targets + distractors, ties
pessimistic; baselines: the source video's own embedding, the edit text's embedding, and chance. `long_text`: each
clip's `detailed_caption` (one long paragraph) is a query against every video of the split (T2V) and vice versa (V2T).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import metrics as M
from ..data import ClipStore
from ..video import decode_clip
from .common import (Cache, directions, gather, list_clips, my_batches, pct, progress_bar, rank_world, split_shards,
                     text_embeddings, video_embeddings)
from .config import KS, EvalCfg


def composed(model, data_dir: str, cache: Cache, cfg: EvalCfg) -> dict:
    tdir, gdir = cfg.composed_split, cfg.composed_split + "_gallery"
    if not all(os.path.isdir(os.path.join(data_dir, d)) for d in (tdir, gdir)):
        return {"protocol": f"not available: {data_dir} has no {tdir}/ + {gdir}/ folders", "num_queries": 0}
    tstore = ClipStore(split_shards(data_dir, tdir))  # the source videos are read one batch at a time
    triplets = [(k, s.meta) for k, s in tstore.index.items() if "src.mp4" in s.members and s.meta
                and isinstance(s.meta.get("edit"), str) and s.meta.get("target_key")][: cfg.max_clips]
    gshards = split_shards(data_dir, gdir)
    gallery = list_clips(gshards)
    chosen = {k for k, _ in triplets}
    if cfg.max_clips is not None and all("triplet" in m for _, m in gallery):
        gallery = [(k, m) for k, m in gallery if m["triplet"] in chosen]
    gname = f"{cfg.composed_split}_gallery-{cfg.num_frames}-videos-{cfg.frame_size}px"
    gvid, _ = video_embeddings(model, gshards, gallery, cache, gname, cfg)
    qname = f"{cfg.composed_split}-{cfg.num_frames}-queries-{cfg.frame_size}px"
    done = cache.load(qname)
    new = {}
    for batch in progress_bar(my_batches([t for t in triplets if t[0] not in done], cfg.batch_size), "composed", cfg):
        frames = torch.from_numpy(np.stack([decode_clip(tstore.read(t[0], "src.mp4"), cfg.num_frames,
                                                        size=cfg.frame_size)[0] for t in batch])).to(model.device)
        feats = model.vision.frame_features(frames)  # one tower pass for both queries
        comp = model.embed_composed(None, [t[1]["edit"] for t in batch], features=feats).embeddings.float().cpu()
        src = model.embed_video(None, features=feats).embeddings.float().cpu()
        new.update({t[0]: {"composed": comp[j], "source": src[j]} for j, t in enumerate(batch)})
    new = gather(new)
    if new:
        done.update(new)
        cache.save(qname, done)
    edits = text_embeddings(model, [t[1]["edit"] for t in triplets], cache, cfg)
    if rank_world()[0] != 0:
        return {}
    gkeys = [k for k, _ in gallery]
    G = torch.stack([gvid[k]["emb"] for k in gkeys]).double()
    pos = torch.tensor([[g == t[1]["target_key"] for g in gkeys] for t in triplets])
    if not bool(pos.any(1).all()):
        raise ValueError(f"some composed targets are not in {cfg.composed_split}_gallery")
    res = {}
    for name, q in (("composed", [done[t[0]]["composed"] for t in triplets]),
                    ("source_only", [done[t[0]]["source"] for t in triplets]),
                    ("edit_text_only", [edits[t[1]["edit"]] for t in triplets])):
        res[name] = pct(M.recall_metrics(M.retrieval_ranks(torch.stack(q).double() @ G.T, pos), KS))
    return {"protocol": f"zero-shot (no composed triplet or target video is trained on; the tiny stage 3 trains the "
                        f"composed prefix on text-only edits of train clips); query = embed_composed(source video, "
                        f"edit text); gallery = every clip of "
                        f"{gdir} (targets + distractors{' of the evaluated triplets' if cfg.max_clips else ''}); "
                        f"the source itself is not in the gallery; ties pessimistic. Baselines: the source video's "
                        f"own embedding, the edit text's embedding, and chance",
            "num_queries": len(triplets), "gallery_size": len(gkeys), **res["composed"],
            "source_only": res["source_only"], "edit_text_only": res["edit_text_only"],
            "chance": pct(M.chance_recall(len(gkeys), np.ones(len(triplets)), KS))}


def long_text(clips, V, temb) -> dict:
    pairs = [(i, m["detailed_caption"]) for i, (_, m) in enumerate(clips)
             if isinstance(m.get("detailed_caption"), str) and m["detailed_caption"].strip()]
    if not pairs:
        return {"protocol": "no clip has `detailed_caption`", "num_texts": 0}
    S = torch.stack([temb[c] for _, c in pairs]).double() @ V.T
    return {"protocol": "zero-shot; each clip's `detailed_caption` (one long paragraph) is a query against every video "
                        "of the split (T2V) and vice versa (V2T); cosine; ties pessimistic",
            "num_texts": len(pairs), **directions(S, [i for i, _ in pairs], len(clips))}
