"""What the sections share: ranks and the fixed work split, the embedding cache, the split's clips and their
annotations, and the ordered passes that embed videos (timed; greedy QA answers in the same pass) and texts.

Work that needs the model is looked up in the cache first; what is missing is split across ranks in fixed batches
(batch b on rank b % world_size, so every rank's batches are the ones a single process would form, and the numbers do
not depend on the world size), computed, all-gathered and written to the cache by rank 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import metrics as M
from ..data import expand_shards, iter_eval_clips, read_shard_index
from .config import KS, EvalCfg


# ------------------------------------------------------------------------------------------------ ranks and caching
def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(local: dict) -> dict:
    """Union of every rank's dict (values must be CPU objects)."""
    rank, world = rank_world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def my_batches(items: list, batch_size: int) -> list[list]:
    rank, world = rank_world()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[rank::world]


def progress_bar(iterable, desc: str, cfg: EvalCfg, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, disable=not cfg.progress or rank_world()[0] != 0, leave=False)


class Cache:
    """Per-item results in one file per kind: a dict item id -> value, merged and rewritten atomically.

    A file is safetensors: the tensors and numpy arrays of the values, plus a JSON tree of everything else (str keys,
    str / int / float / bool / None leaves, lists, dicts) in the metadata, where an array stands as {"__tensor__": n}
    or {"__ndarray__": n}. Nothing in it is unpickled, so a shared or tampered cache cannot run code: a file that is
    not such a cache is refused with one warning naming it and its entries are recomputed."""

    FORMAT = "ville-cache-v1"

    def __init__(self, root: str | None, identity: str):
        self.root, self.identity = root, identity

    def path(self, name: str) -> str:
        return os.path.join(self.root, f"{self.identity}-{name}.safetensors")

    def _refuse(self, path: str, why: str) -> dict:
        if rank_world()[0] == 0:
            print(f"warning: cache file {path} refused ({why}); not opened as a pickle, its entries are recomputed "
                  f"and the file rewritten", file=sys.stderr)
        return {}

    def load(self, name: str) -> dict:
        if not self.root:
            return {}
        path = self.path(name)
        old = path[:-len(".safetensors")] + ".pt"
        if os.path.isfile(old) and not os.path.isfile(path):
            return self._refuse(old, "an old-format torch pickle; delete it once the new cache is written")
        if not os.path.isfile(path):
            return {}
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != self.FORMAT:
                    return self._refuse(path, f"not a ville cache: format {meta.get('format')!r}")
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            tree = json.loads(meta["tree"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            return self._refuse(path, f"not a safetensors ville cache: {str(e).splitlines()[0][:160]}")

        def decode(x):
            if isinstance(x, dict):
                if len(x) == 1 and "__tensor__" in x:
                    return arrays[x["__tensor__"]]
                if len(x) == 1 and "__ndarray__" in x:
                    return arrays[x["__ndarray__"]].numpy()
                return {k: decode(v) for k, v in x.items()}
            return [decode(v) for v in x] if isinstance(x, list) else x

        return decode(tree)

    def save(self, name: str, data: dict) -> None:
        """Called by every rank with the same (gathered) data; rank 0 writes, then all wait, so no rank ever loads a
        file another rank is about to change and every rank sees the same cache state (the work split relies on it)."""
        rank, world = rank_world()
        if self.root and rank == 0:
            from safetensors.torch import save_file

            arrays: dict[str, torch.Tensor] = {}

            def encode(x):
                if isinstance(x, (torch.Tensor, np.ndarray)):
                    tag = "__tensor__" if isinstance(x, torch.Tensor) else "__ndarray__"
                    name_ = str(len(arrays))
                    # a copy: safetensors refuses tensors that share storage (rows of one batch's output do)
                    arrays[name_] = (x.detach().cpu() if tag == "__tensor__" else torch.from_numpy(x)).clone()
                    return {tag: name_}
                if isinstance(x, dict):
                    return {str(k): encode(v) for k, v in x.items()}
                if isinstance(x, (list, tuple)):
                    return [encode(v) for v in x]
                return x.item() if isinstance(x, np.generic) else x

            tree = json.dumps(encode(data))
            os.makedirs(self.root, exist_ok=True)
            tmp = self.path(name) + ".tmp"
            save_file(arrays, tmp, metadata={"format": self.FORMAT, "tree": tree})
            os.replace(tmp, self.path(name))
        if world > 1:
            dist.barrier()


def state_identity(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's weights and config (for a saved model use
    `ville.checkpoint.model_identity`)."""
    from ..config import to_yaml

    h = hashlib.sha256()
    if getattr(model, "cfg", None) is not None:
        h.update(to_yaml(model.cfg).encode() + b"\0")
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sd-" + h.hexdigest()[:16]


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


# ---------------------------------------------------------------------------------------------------------- clips
def split_shards(data_dir: str, split: str) -> list[str]:
    d = os.path.join(data_dir, split)
    if not os.path.isdir(d):
        raise ValueError(f"{data_dir!r} has no split folder {split!r}")
    return expand_shards(os.path.join(d, "*.tar"))


def list_clips(shards: list[str]) -> list[tuple[str, dict]]:
    """(key, JSON) of every clip with a non-empty video member, in the order `iter_eval_clips` yields them."""
    out = []
    for shard in shards:
        for s in read_shard_index(shard):
            member = "mp4" if "mp4" in s.members else (s.meta or {}).get("video_ext")
            if member in s.members and s.members[member][1] > 0:
                out.append((s.key, s.meta or {}))
    return out


def captions(meta: dict) -> list[str]:
    caps = meta.get("captions")
    caps = [c for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []
    if not caps and isinstance(meta.get("caption"), str) and meta["caption"].strip():
        caps = [meta["caption"]]
    return caps


def single_caption(meta: dict) -> str | None:
    cap = meta.get("caption")
    if isinstance(cap, str) and cap.strip():
        return cap
    caps = captions(meta)
    return caps[0] if caps else None


def qa_items(meta: dict) -> list[dict]:
    qa = meta.get("qa")
    return [q for q in qa if isinstance(q, dict) and isinstance(q.get("question"), str)
            and str(q.get("answer", "")).strip()] if isinstance(qa, list) else []


def events(meta: dict) -> list[dict]:
    evs = meta.get("events")
    return [e for e in evs if isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip()
            and isinstance(e.get("start"), (int, float)) and isinstance(e.get("end"), (int, float))
            and e["end"] > e["start"]] if isinstance(evs, list) else []


def _clip_pass(model, shards, order: dict, need_embed: set, need_qa: dict, cfg: EvalCfg, desc: str
               ) -> tuple[dict, dict]:
    """One ordered pass over clips: video embeddings (timed) for keys in `need_embed`, greedy answers for
    need_qa {key: [(qid, prompt)]}. `order` maps key -> position; the pass stops after the last needed one."""
    videos, answers = {}, {}
    wanted = [order[k] for k in set(need_embed) | set(need_qa) if k in order]
    if not wanted:
        return gather(videos), gather(answers)
    stop = max(wanted)
    rank, world = rank_world()
    total = math.ceil((stop + 1) / cfg.batch_size / world)
    loader = iter_eval_clips(shards, cfg.num_frames, rank=rank, world_size=world, batch_size=cfg.batch_size,
                             frame_size=cfg.frame_size)
    for batch in progress_bar(loader, desc, cfg, total):
        keys, frames = batch["keys"], batch["frames"]
        if order.get(keys[0], -1) > stop:
            break
        idx = [i for i, k in enumerate(keys) if k in need_embed]
        if idx:
            _sync(model)
            t0 = time.perf_counter()
            out = model.embed_video(frames[idx].to(model.device))
            _sync(model)
            ms = 1000 * (time.perf_counter() - t0) / len(idx)
            for j, i in enumerate(idx):
                videos[keys[i]] = {"emb": out.embeddings[j].float().cpu(), "tokens": int(out.num_tokens[j]),
                                   "ms": ms, "batch": len(idx)}
        items = [(i, qid, prompt) for i, k in enumerate(keys) for qid, prompt in need_qa.get(k, [])]
        # One tower pass per clip, not per question (~14 per clip; the tower was most of QA's time).
        tokens = model.video_tokens(frames.to(model.device)) if items else None
        for chunk in [items[j:j + cfg.batch_size] for j in range(0, len(items), cfg.batch_size)]:
            sel = torch.tensor([c[0] for c in chunk], device=tokens.device)
            texts = model.generate(None, [c[2] for c in chunk], max_new_tokens=cfg.qa_max_new_tokens,
                                   min_new_tokens=cfg.qa_min_new_tokens, video=tokens[sel])
            answers.update({c[1]: t for c, t in zip(chunk, texts)})
    return gather(videos), gather(answers)


def video_embeddings(model, shards, clips, cache: Cache, name: str, cfg: EvalCfg, need_qa: dict | None = None,
                     qa_name: str | None = None) -> tuple[dict, dict]:
    order = {k: i for i, (k, _) in enumerate(list_clips(shards))}
    videos = cache.load(name)
    answers = cache.load(qa_name) if qa_name else {}
    need_embed = {k for k, _ in clips if k not in videos}
    todo_qa = {k: [q for q in v if q[0] not in answers] for k, v in (need_qa or {}).items()}
    todo_qa = {k: v for k, v in todo_qa.items() if v}
    new_v, new_a = _clip_pass(model, shards, order, need_embed, todo_qa, cfg, f"clips {name}")
    if new_v:
        videos.update(new_v)
        cache.save(name, videos)
    if new_a:
        answers.update(new_a)
        cache.save(qa_name, answers)
    missing = [k for k, _ in clips if k not in videos] + [k for k, v in (need_qa or {}).items()
                                                         if any(q not in answers for q, _ in v)]
    if missing:
        raise RuntimeError(f"{len(missing)} clips could not be embedded (undecodable?), e.g. {missing[:3]}")
    return videos, answers


def text_embeddings(model, texts: list[str], cache: Cache, cfg: EvalCfg, moment: bool = False) -> dict:
    """text -> embedding, cached; `moment`: moment queries, after embed.moment_text_prompt and through the moment
    adapter (a cache of their own when either is set)."""
    own = model.cfg.embed.moment_text_prompt or model.moment_adapter is not None
    name = "moment-texts" if moment and own else "texts"
    done = cache.load(name)
    missing = sorted(set(texts) - set(done))
    new = {}
    for batch in progress_bar(my_batches(missing, cfg.batch_size), name, cfg):
        emb = model.embed_text(batch, moment=moment).float().cpu()
        new.update(zip(batch, emb))
    new = gather(new)
    if new:
        done.update(new)
        cache.save(name, done)
    return done


# ------------------------------------------------------------------------------------------- shared by the sections
def pct(d: dict) -> dict:
    return {k: (round(v, 2) if isinstance(v, float) and k != "n" else v) for k, v in d.items()}


def directions(scores: torch.Tensor, owner: list[int], num_videos: int, cfg_ks=KS) -> dict:
    """scores (num_texts, num_videos); owner[t] = the video of text t. T2V over texts, V2T over videos with text."""
    owner_t = torch.tensor(owner)
    pos = torch.zeros(scores.shape, dtype=torch.bool)
    pos[torch.arange(len(owner)), owner_t] = True
    t2v = M.retrieval_ranks(scores, pos)
    has = pos.any(0)
    v2t = M.retrieval_ranks(scores.T[has], pos.T[has])
    return {"t2v": pct(M.recall_metrics(t2v, cfg_ks)), "v2t": pct(M.recall_metrics(v2t, cfg_ks)),
            "chance": {"t2v": pct(M.chance_recall(num_videos, np.ones(len(owner)), cfg_ks)),
                       "v2t": pct(M.chance_recall(len(owner), pos.T[has].sum(1).numpy(), cfg_ks))}}
