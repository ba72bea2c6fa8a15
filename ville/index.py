"""Build a search index: embed every video of a folder of mp4 files or of WebDataset shards.

    python -m ville.index MODEL_DIR SOURCE [SOURCE ...] --out INDEX [--num-frames T] [--batch-size B]
        [--frame-size S] [--device cuda]

SOURCE is a folder (every *.mp4 below it, sorted; ids are paths relative to the folder), a single .mp4 file (id:
its file name), or shard patterns (`DIR/test/shard-*.tar`, braces allowed; ids are the sample keys). The index is one
`torch.save` file: L2-normalised float32 embeddings (N, D), ids, embedding token counts, where each video lives
(absolute path, or shard + key) so `ville.search --rerank` can decode it again, the frame settings, and the model's
identity (`ville.checkpoint.model_identity`), which `ville.search` checks before embedding a query.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

from .data import expand_shards, iter_eval_clips, read_shard_index
from .video import VideoDecodeError, decode_clip

FORMAT = "ville-index-v1"
log = logging.getLogger(__name__)


def _is_shard_pattern(source: str) -> bool:
    return source.endswith(".tar") or "{" in source or glob.has_magic(source)


def _video_files(source: str) -> list[tuple[str, str]]:
    """(id, absolute path) of the mp4 files of a folder (recursive, sorted) or of one file."""
    if os.path.isfile(source):
        return [(os.path.basename(source), os.path.abspath(source))]
    files = sorted(glob.glob(os.path.join(source, "**", "*.mp4"), recursive=True))
    return [(os.path.relpath(f, source).replace(os.sep, "/"), os.path.abspath(f)) for f in files]


def _embed(model, frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.embed_video(torch.from_numpy(np.stack(frames)).to(model.device))
    return out.embeddings.float().cpu(), out.num_tokens.cpu()


@torch.no_grad()
def build_index(model, sources: list[str], *, identity: str, model_dir: str | None = None,
                num_frames: int | None = None, batch_size: int = 8, frame_size: int | None = None,
                progress: bool = True) -> dict:
    """Embed every video of `sources` -> the index dict (see the module docstring). Undecodable videos are skipped
    with a warning and counted in `skipped`; duplicate ids raise."""
    model.eval()
    num_frames = num_frames or model.cfg.vision.max_frames
    size = model.vision.input_size
    frame_size = frame_size or (size[0] if size[0] == size[1] else None)
    ids, where, embs, tokens, skipped = [], [], [], [], []
    for source in sources:
        if _is_shard_pattern(source):
            shards = expand_shards(source)
            shard_of = {s.key: os.path.abspath(s.shard) for sh in shards for s in read_shard_index(sh)}
            loader = iter_eval_clips(shards, num_frames, batch_size=batch_size, frame_size=frame_size)
            for batch in tqdm(loader, desc=f"index {source}", disable=not progress, leave=False):
                e, t = _embed(model, list(batch["frames"].numpy()))
                ids += batch["keys"]
                where += [{"shard": shard_of[k], "key": k} for k in batch["keys"]]
                embs.append(e)
                tokens.append(t)
            skipped += [f"{sh}:{key} ({reason})" for reason, examples in loader.skips.examples.items()
                        for sh, key, _ in examples]
            continue
        files = _video_files(source)
        if not files:
            raise ValueError(f"index source {source!r}: no .mp4 file there (and not a shard pattern)")
        pending: list[tuple[str, str, np.ndarray]] = []
        for i, (vid, path) in enumerate(tqdm(files, desc=f"index {source}", disable=not progress, leave=False)):
            try:
                pending.append((vid, path, decode_clip(path, num_frames, size=frame_size)[0]))
            except VideoDecodeError as e:
                log.warning("skipped %s: %s", path, e)
                skipped.append(path)
            if pending and (len(pending) == batch_size or i == len(files) - 1):
                e, t = _embed(model, [p[2] for p in pending])
                ids += [p[0] for p in pending]
                where += [{"path": p[1]} for p in pending]
                embs.append(e)
                tokens.append(t)
                pending = []
    if not ids:
        raise ValueError(f"no video could be indexed from {sources}")
    seen: dict[str, int] = {}
    for i, vid in enumerate(ids):
        if vid in seen:
            raise ValueError(f"duplicate id {vid!r} in the index sources ({where[seen[vid]]} and {where[i]}); "
                             f"index them separately")
        seen[vid] = i
    return {"format": FORMAT, "model_identity": identity,
            "model_dir": os.path.abspath(model_dir) if model_dir else None,
            "embeddings": torch.cat(embs), "ids": ids, "num_tokens": torch.cat(tokens), "sources": where,
            "num_frames": num_frames, "frame_size": frame_size, "skipped": skipped,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def save_index(index: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(index, tmp)
    os.replace(tmp, path)


def load_index(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"no index at {path!r} (build one with python -m ville.index)")
    index = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a ville index (format {FORMAT})")
    return index


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ville.index", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder written by save_pretrained")
    p.add_argument("sources", nargs="+", help="folder of .mp4 files, an .mp4 file, or shard patterns")
    p.add_argument("--out", required=True, help="index file to write")
    p.add_argument("--num-frames", type=int, default=None, help="default: the model's max_frames")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frame-size", type=int, default=None, help="default: the vision tower's input size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from .checkpoint import model_identity
    from .model import ViLLE

    model = ViLLE.from_pretrained(a.model, map_location=a.device)
    index = build_index(model, a.sources, identity=model_identity(a.model), model_dir=a.model,
                        num_frames=a.num_frames, batch_size=a.batch_size, frame_size=a.frame_size,
                        progress=not a.no_progress)
    save_index(index, a.out)
    print(f"indexed {len(index['ids'])} videos ({len(index['skipped'])} skipped) with model "
          f"{index['model_identity']} -> {a.out}")
    return index


if __name__ == "__main__":
    main()
