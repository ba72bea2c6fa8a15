"""The driver: `evaluate` checks the options, loads the model and keys the cache by its identity; `_run` lists the
split's clips, computes (or reads from the cache) the video and text embeddings the sections share, then runs each
section (metrics on rank 0 only); `format_table` prints every metric beside its baseline.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import asdict, fields

import torch

from ..data import QA_PROMPT, ClipStore
from .adaptive import adaptive
from .binding import binding
from .common import (Cache, captions, events, list_clips, qa_items, rank_world, single_caption, split_shards,
                     state_identity, text_embeddings, video_embeddings)
from .composed import composed, long_text
from .config import KS, TASKS, EvalCfg
from .moments import moment
from .qa import qa
from .retrieval import rerank, retrieval


# ------------------------------------------------------------------------------------------------------ the driver
def evaluate(model, data_dir: str, tasks=TASKS, split: str = "test", *, identity: str | None = None,
             model_dir: str | None = None, **options) -> dict | None:
    """Run `tasks` on `data_dir/split`; returns the results dict on rank 0 (None elsewhere) and writes
    `options["out"]` (JSON) and the adaptive plot beside it when `out` is given."""
    from ..checkpoint import model_identity
    from ..model import ViLLE

    unknown = set(options) - {f.name for f in fields(EvalCfg)}
    if unknown:
        raise TypeError(f"evaluate(): unknown option(s) {sorted(unknown)}; known: {[f.name for f in fields(EvalCfg)]}")
    cfg = EvalCfg(tasks=tuple(tasks), split=split, **options)
    bad = set(cfg.tasks) - set(TASKS)
    if bad:
        raise ValueError(f"unknown task(s) {sorted(bad)}; choose from {TASKS}")
    for name in ("batch_size", "window_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.moment_score not in ("cosine", "zscale"):
        raise ValueError(f"moment_score: expected 'cosine' or 'zscale', got {cfg.moment_score!r}")
    model_dir = os.path.abspath(model_dir) if model_dir else None
    if isinstance(model, (str, os.PathLike)):
        model_dir = os.path.abspath(model)
        identity = identity or model_identity(model_dir)
        model = ViLLE.from_pretrained(model_dir)
    model.eval()
    identity = identity or state_identity(model)
    size = model.vision.input_size
    cfg.frame_size = cfg.frame_size or (size[0] if size[0] == size[1] else None)
    cfg.num_frames = cfg.num_frames or model.cfg.vision.max_frames
    if not 1 <= cfg.num_frames <= model.cfg.vision.max_frames:
        raise ValueError(f"num_frames {cfg.num_frames} outside 1..{model.cfg.vision.max_frames} (model max_frames)")
    out_dir = os.path.dirname(os.path.abspath(cfg.out)) if cfg.out else None
    cache_root = cfg.cache_dir if cfg.cache_dir is not None else (os.path.join(out_dir, "cache") if out_dir else None)
    cache = Cache(cache_root or None, identity)
    rank, world = rank_world()
    t_start = time.perf_counter()

    with torch.no_grad():
        results = _run(model, data_dir, cfg, cache, out_dir)
    if rank != 0:
        return None
    results["meta"] = {
        "model_identity": identity, "model_dir": model_dir, "data_dir": os.path.abspath(data_dir),
        "split": cfg.split, "tasks": list(cfg.tasks), "counts": results.pop("_counts"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "world_size": world, "torch": torch.__version__, "seconds": round(time.perf_counter() - t_start, 2),
        "cache_dir": cache_root or None, "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}}
    results = json.loads(json.dumps(results))  # what the caller gets is exactly what the file holds
    if cfg.out:
        tmp = cfg.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, cfg.out)
    return results


def _run(model, data_dir: str, cfg: EvalCfg, cache: Cache, out_dir: str | None) -> dict:
    tasks = set(cfg.tasks)
    shards = split_shards(data_dir, cfg.split)
    clips = list_clips(shards)[: cfg.max_clips]
    counts = {"clips": len(clips)}
    results: dict = {}
    if tasks - {"composed", "binding"}:
        need_qa = {}
        if "qa" in tasks:
            need_qa = {k: [(f"{k}#{i}", QA_PROMPT.format(question=q["question"].strip()))
                           for i, q in enumerate(qa_items(m))] for k, m in clips}
        name = f"{cfg.split}-{cfg.num_frames}-videos-{cfg.frame_size}px"
        videos, answers = video_embeddings(model, shards, clips, cache, name, cfg, need_qa,
                                           f"{cfg.split}-{cfg.num_frames}-qa{cfg.qa_min_new_tokens}-"
                                           f"{cfg.qa_max_new_tokens}-{cfg.frame_size}px")
        V = torch.stack([videos[k]["emb"] for k, _ in clips]).double()
        texts = []
        if tasks & {"retrieval", "rerank"}:
            texts += [c for _, m in clips for c in captions(m) + [single_caption(m)] if c]
        if "long_text" in tasks:
            texts += [m["detailed_caption"] for _, m in clips if isinstance(m.get("detailed_caption"), str)]
        temb = text_embeddings(model, texts, cache, cfg)
        store = ClipStore(shards) if tasks & {"rerank", "moment"} else None
        lead = rank_world()[0] == 0  # sections without model work run on rank 0 only
        model_scale = float(model.logit_scale.exp().clamp(max=model.cfg.embed.max_logit_scale))
        scale = cfg.dual_softmax_scale or model_scale
        if "retrieval" in tasks and lead:
            results["retrieval"] = retrieval(clips, V, temb, cfg, scale)
        if "rerank" in tasks:
            results["rerank"] = rerank(model, clips, V, temb, store, cache, cfg, model_scale)
        if "moment" in tasks:
            queries = [ev["text"] for _, m in clips for ev in events(m)]
            texts += queries
            results["moment"] = moment(model, clips, text_embeddings(model, queries, cache, cfg, moment=True), store,
                                       cache, cfg)
        if "qa" in tasks and lead:
            results["qa"] = qa(clips, answers, data_dir, cfg)
        if "long_text" in tasks and lead:
            results["long_text"] = long_text(clips, V, temb)
        if "adaptive" in tasks:
            plot = os.path.join(out_dir, f"adaptive_tokens_{cfg.split}.png") if out_dir else None
            results["adaptive"] = adaptive(model, clips, videos, plot, cfg) if lead else {}
        counts["texts"] = len(set(texts))
    if "composed" in tasks:
        results["composed"] = composed(model, data_dir, cache, cfg)
    if "binding" in tasks:
        results["binding"] = binding(model, data_dir, cache, cfg)
    results["_counts"] = counts
    return results


# ------------------------------------------------------------------------------------------------------- reporting
def format_table(results: dict) -> str:
    """Plain-text table: section, metric, value, and the baseline beside it."""
    rows = [("section", "metric", "value", "baseline")]

    def add(section, metric, value, base=None, label=""):
        rows.append((section, metric, "-" if value is None else f"{value:.2f}",
                     "" if base is None else f"{base:.2f} ({label})"))

    for proto, r in results.get("retrieval", {}).items():
        multi = "v2t_video_max" in r if isinstance(r, dict) else False
        names = {"t2v": "T2V", "v2t": "V2T among all texts" if multi else "V2T",
                 "v2t_video_max": "V2T per-video max (CLIP4Clip)"}
        for d in [d for d in names if d in r] if isinstance(r, dict) and "t2v" in r else ():
            for k in KS:
                add(f"retrieval/{proto}", f"{names[d]} R@{k}", r[d][f"R@{k}"], r["chance"][d][f"R@{k}"], "chance")
            add(f"retrieval/{proto}", f"{names[d]} MdR", r[d]["MdR"])
    if (r := results.get("rerank", {})).get("num_queries"):
        for k in KS:
            add(f"rerank (top-{r['k']})", f"T2V R@{k}", r["stage2"][f"R@{k}"], r["stage1"][f"R@{k}"], "stage 1")
    if (r := results.get("moment", {})).get("num_queries") and "random_ranking" in r:
        for m in ("Rank@1", "Rank@5", "mIoU"):
            add("moment (DiDeMo rule)", m, r[m], r["random_ranking"][m], "random ranking")
    elif r.get("num_queries"):
        for m in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP@0.5", "mAP@0.75", "mAP"):
            add("moment", m, r[m], r["random_window"].get(m), "random window")
    if (r := results.get("qa", {})).get("num_questions"):
        add("qa", "accuracy", r["accuracy"], r["majority_baseline"], f"majority, {r['baseline_source']}")
    if (r := results.get("composed", {})).get("num_queries"):
        for k in KS:
            add("composed", f"R@{k}", r[f"R@{k}"], r["chance"][f"R@{k}"], "chance")
        add("composed", "R@1 source video only", r["source_only"]["R@1"])
        add("composed", "R@1 edit text only", r["edit_text_only"]["R@1"])
    if (r := results.get("long_text", {})).get("num_texts"):
        for k in KS:
            add("long_text", f"T2V R@{k}", r["t2v"][f"R@{k}"], r["chance"]["t2v"][f"R@{k}"], "chance")
    if r := results.get("adaptive"):
        add("adaptive", "mean tokens", r["mean_tokens"])
        add("adaptive", "spearman(tokens, complexity)", r.get("spearman_tokens_complexity"))
        add("adaptive", "latency ms/video (median)", r["latency_ms_per_video"]["median"])
    if (r := results.get("binding", {})).get("num_pairs"):
        for m, label in (("t2v", "T2V acc"), ("v2t", "V2T acc"), ("pair_both", "all 4 trials right")):
            add("binding", label, r[m], r["chance"][m], "chance")
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])
