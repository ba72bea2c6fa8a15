"""Build or update a search index: embed every video of a folder of mp4 files or of WebDataset shards.

    python -m ville.index MODEL_DIR SOURCE [SOURCE ...] --out INDEX [--num-frames T] [--batch-size B]
        [--frame-size S] [--device cuda] [--full]

SOURCE is a folder (every *.mp4 below it, sorted; ids are paths relative to the folder), a single .mp4 file (id:
its file name), or shard patterns (`DIR/test/shard-*.tar`, braces allowed; ids are the sample keys).

The index is one safetensors file, readable without torch and without running any code: tensors `embeddings`
(N, D) float32, L2-normalised, and `num_tokens` (N,) int64; metadata `format` ("ville-index-v2") and `index`, a JSON
object with the ids, where each video lives (absolute path, or shard + key, with the file's size and mtime, so
`ville.search --rerank` can decode it again and an update can tell what changed), the frame settings, the videos
skipped and the model's identity (`ville.checkpoint.model_identity`), which `ville.search` checks before embedding a
query. Read it with `safetensors.numpy.load_file` and `safetensors.safe_open(path, "np").metadata()`.

Updating: when INDEX exists and was built by the same model with the same frame settings, a video whose file (path,
size and mtime; a shard's for shard sources) is unchanged keeps its embedding; new and changed ones are embedded and
those no longer in the sources are dropped. Another model (or --full) re-embeds everything. The new index replaces
the old one in one rename, so an interrupted run leaves the old index as it was.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import logging
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from .data import expand_shards, iter_eval_clips
from .video import VideoDecodeError, decode_clip

FORMAT = "ville-index-v2"
log = logging.getLogger(__name__)


def _is_shard_pattern(source: str) -> bool:
    return source.endswith(".tar") or "{" in source or glob.has_magic(source)


def _video_files(source: str) -> list[tuple[str, str]]:
    """(id, absolute path) of the mp4 files of a folder (recursive, sorted) or of one file."""
    if os.path.isfile(source):
        return [(os.path.basename(source), os.path.abspath(source))]
    files = sorted(glob.glob(os.path.join(source, "**", "*.mp4"), recursive=True))
    return [(os.path.relpath(f, source).replace(os.sep, "/"), os.path.abspath(f)) for f in files]


def _stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _embed(model, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    out = model.embed_video(torch.from_numpy(np.stack(frames)).to(model.device))
    return out.embeddings.float().cpu().numpy(), out.num_tokens.cpu().numpy().astype(np.int64)


class _Rows:
    """The index being built: one row per video, in source order."""

    def __init__(self):
        self.ids, self.sources, self.embs, self.tokens = [], [], [], []

    def add(self, vid: str, source: dict, emb: np.ndarray, tokens: int) -> None:
        self.ids.append(vid)
        self.sources.append(source)
        self.embs.append(emb)
        self.tokens.append(int(tokens))


@torch.no_grad()
def build_index(model, sources: list[str], *, identity: str, model_dir: str | None = None,
                num_frames: int | None = None, batch_size: int = 8, frame_size: int | None = None,
                progress: bool = True, previous: dict | None = None) -> dict:
    """Embed every video of `sources` -> the index dict (the module docstring's fields; embeddings and num_tokens as
    numpy arrays). `previous`: an index to update (module docstring); `stats` says how many rows were embedded, kept
    and dropped. Undecodable videos are skipped with a warning and listed in `skipped`; duplicate ids and sources with
    nothing indexable raise ValueError."""
    model.eval()
    num_frames = num_frames or model.cfg.vision.max_frames
    size = model.vision.input_size
    frame_size = frame_size or (size[0] if size[0] == size[1] else None)
    old: dict[tuple, int] = {}  # (path,) or (shard, key) -> row of `previous` that may be kept
    if previous is not None and (previous["model_identity"], previous["num_frames"], previous["frame_size"]) == (
            identity, num_frames, frame_size):
        old = {(s["path"],) if "path" in s else (s["shard"], s["key"]): i for i, s in enumerate(previous["sources"])}

    def kept(row: int, stamp: dict) -> bool:
        src = previous["sources"][row]
        return (src.get("size"), src.get("mtime_ns")) == (stamp["size"], stamp["mtime_ns"])

    rows, skipped, embedded, reused = _Rows(), [], 0, 0
    for source in sources:
        if _is_shard_pattern(source):
            for shard in expand_shards(source):
                shard, stamp = os.path.abspath(shard), _stamp(shard)
                mine = [i for k, i in old.items() if k[0] == shard and len(k) == 2]
                if mine and all(kept(i, stamp) for i in mine):
                    for i in sorted(mine):
                        rows.add(previous["ids"][i], previous["sources"][i], previous["embeddings"][i],
                                 previous["num_tokens"][i])
                    skipped += [s for s in previous["skipped"] if s.get("shard") == shard]
                    reused += len(mine)
                    continue
                loader = iter_eval_clips([shard], num_frames, batch_size=batch_size, frame_size=frame_size)
                for batch in tqdm(loader, desc=f"index {shard}", disable=not progress, leave=False):
                    e, t = _embed(model, list(batch["frames"].numpy()))
                    for j, key in enumerate(batch["keys"]):
                        rows.add(key, {"shard": shard, "key": key, **stamp}, e[j], t[j])
                    embedded += len(batch["keys"])
                skipped += [{"shard": shard, "key": key, "reason": reason}
                            for reason, examples in loader.skips.examples.items() for _, key, _ in examples]
            continue
        files = _video_files(source)
        if not files:
            raise ValueError(f"index source {source!r}: no .mp4 file there (and not a shard pattern)")
        slots: list = [None] * len(files)
        pending: list[tuple[int, str, dict, np.ndarray]] = []
        for n, (vid, path) in enumerate(tqdm(files, desc=f"index {source}", disable=not progress, leave=False)):
            stamp, row = _stamp(path), old.get((path,))
            if row is not None and kept(row, stamp):
                slots[n] = (vid, previous["sources"][row], previous["embeddings"][row], previous["num_tokens"][row])
                reused += 1
            else:
                try:
                    pending.append((n, vid, {"path": path, **stamp}, decode_clip(path, num_frames, size=frame_size)[0]))
                except VideoDecodeError as e:
                    log.warning("skipped %s: %s", path, e)
                    skipped.append({"path": path, "reason": str(e)[:200]})
            if pending and (len(pending) == batch_size or n == len(files) - 1):
                e, t = _embed(model, [p[3] for p in pending])
                for j, (slot, vid_, where, _) in enumerate(pending):
                    slots[slot] = (vid_, where, e[j], t[j])
                embedded += len(pending)
                pending = []
        for slot in slots:
            if slot is not None:
                rows.add(*slot)
    if not rows.ids:
        why = "; ".join(f"{s.get('path') or s['shard'] + ':' + s['key']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"nothing indexable in {', '.join(sources)}: "
                         + (f"all {len(skipped)} videos were skipped ({why}{', ...' if len(skipped) > 3 else ''})"
                            if skipped else "no video found"))
    seen: dict[str, int] = {}
    for i, vid in enumerate(rows.ids):
        if vid in seen:
            raise ValueError(f"duplicate id {vid!r} in the index sources ({rows.sources[seen[vid]]} and "
                             f"{rows.sources[i]}); index them separately")
        seen[vid] = i
    return {"format": FORMAT, "model_identity": identity,
            "model_dir": os.path.abspath(model_dir) if model_dir else None,
            "embeddings": np.stack(rows.embs).astype(np.float32), "ids": rows.ids,
            "num_tokens": np.array(rows.tokens, dtype=np.int64), "sources": rows.sources,
            "num_frames": num_frames, "frame_size": frame_size, "skipped": skipped,
            "stats": {"embedded": embedded, "kept": reused,
                      "dropped": len(previous["ids"]) - reused if previous is not None else 0},
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


_ARRAYS = ("embeddings", "num_tokens")


def save_index(index: dict, path: str) -> None:
    """Write to `path.tmp`, then rename: readers and an interrupted writer never see a partial index."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = {k: v for k, v in index.items() if k not in _ARRAYS and k != "format"}
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(index[k]) for k in _ARRAYS}, tmp,
              metadata={"format": FORMAT, "index": json.dumps(info)})
    os.replace(tmp, path)


def load_index(path: str) -> dict:
    """Read an index without pickle (nothing in the file can run code). ValueError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ValueError(f"no index at {path!r} (build one with python -m ville.index)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise ValueError(f"{path}: refused: a pickle (an old-format torch.save index, or a crafted file), which could "
                         f"run code if opened; not opened. Re-create it with python -m ville.index")
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or set(f.keys()) != set(_ARRAYS):
                raise ValueError(f"{path}: not a ville index (format {FORMAT}; found {meta.get('format')!r})")
            arrays = {k: f.get_tensor(k) for k in _ARRAYS}
        info = json.loads(meta["index"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a ville index (not a readable safetensors file: "
                         f"{str(e).splitlines()[0][:200]})") from e
    return {"format": FORMAT, **info, **arrays}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ville.index", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder written by save_pretrained")
    p.add_argument("sources", nargs="+", help="folder of .mp4 files, an .mp4 file, or shard patterns")
    p.add_argument("--out", required=True, help="index file to write (updated in place when it exists)")
    p.add_argument("--num-frames", type=int, default=None, help="default: the model's max_frames")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frame-size", type=int, default=None, help="default: the vision tower's input size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="re-embed every video even when --out can be updated")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from .checkpoint import model_identity
    from .model import ViLLE

    try:
        identity = model_identity(a.model)
        previous = None
        if os.path.exists(a.out) and not a.full:
            try:
                previous = load_index(a.out)
            except ValueError as e:
                print(f"note: building {a.out} afresh: {e}", file=sys.stderr)
            if previous is not None and previous["model_identity"] != identity:
                print(f"note: re-embedding every video: {a.out} was built by model {previous['model_identity']}, "
                      f"{a.model} is {identity}", file=sys.stderr)
        model = ViLLE.from_pretrained(a.model, map_location=a.device)
        index = build_index(model, a.sources, identity=identity, model_dir=a.model, num_frames=a.num_frames,
                            batch_size=a.batch_size, frame_size=a.frame_size, progress=not a.no_progress,
                            previous=previous)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    save_index(index, a.out)
    st = index["stats"]
    print(f"indexed {len(index['ids'])} videos ({st['embedded']} embedded, {st['kept']} kept, {st['dropped']} "
          f"dropped, {len(index['skipped'])} skipped) with model {index['model_identity']} -> {a.out}")
    return index


if __name__ == "__main__":
    main()
