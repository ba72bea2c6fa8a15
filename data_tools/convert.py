"""Convert a real dataset's annotations and local videos into ville shards (schema: data_tools/SCHEMA.md).

    python -m data_tools.convert FORMAT --annotations PATH [PATH ...] --videos DIR --out OUTDIR \
        [--split NAME] [--split-csv PATH] [--workers N] [--shard-size Z] [--keep-container]

FORMAT is one of msrvtt, msrvtt_qa, webvid, webvid_covr, didemo, activitynet, charades_sta, qvhighlights, longcap.
Shards go to OUTDIR/<split>/shard-*.tar with OUTDIR/<split>/meta.json and OUTDIR/<split>/missing.txt. Videos the
annotations name but --videos lacks are counted, warned about, listed in missing.txt and skipped; videos that exist
but cannot be read are listed in failed.txt. Shards are written in parallel, one worker per shard.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from data_tools.converters.common import MP4_FAMILY, VIDEO_EXTS, Output, Record
from data_tools.shards import brace_pattern, probe_duration, shard_name, transcode_to_mp4, write_tar


def find_video(videos_dir: Path, candidates: list[str]) -> Path | None:
    """The first existing file among the candidates: a name with a video extension as given, then its stem (or a
    name without one, such as QVHighlights' `…_360.0_510.0`) with each known extension."""
    for cand in candidates:
        p = videos_dir / cand
        if p.suffix.lower() in VIDEO_EXTS:
            if p.is_file():
                return p
            p = p.with_suffix("")
        elif p.is_file():
            return p
        for ext in VIDEO_EXTS:
            q = p.with_name(p.name + ext)
            if q.is_file():
                return q
    return None


def _unique_keys(records: list[Record]) -> None:
    # Two ids can sanitise to one key ("a.b" and "a_b"); a duplicate key would merge samples in WebDataset.
    seen: dict[str, int] = {}
    renamed = 0
    for rec in records:
        n = seen.get(rec.key, 0)
        seen[rec.key] = n + 1
        if n:
            rec.key = f"{rec.key}-{n}"
            rec.meta["key"] = rec.key
            renamed += 1
            seen.setdefault(rec.key, 1)
    if renamed:
        warnings.warn(f"{renamed} sample key(s) collided after sanitising and got a '-N' suffix")


def _clip_to_duration(meta: dict) -> None:
    d = meta["duration"]
    for ev in meta.get("events", []):
        ev["start"], ev["end"] = round(min(ev["start"], d), 3), round(min(ev["end"], d), 3)
        if "windows" in ev:
            ev["windows"] = [[round(min(s, d), 3), round(min(e, d), 3)] for s, e in ev["windows"]]


def _sample(rec: Record, paths: dict[str, Path], keep_container: bool) -> dict:
    meta = json.loads(json.dumps(rec.meta))
    sample = {"__key__": rec.key}
    for member, path in paths.items():
        suffix = path.suffix.lower()
        if suffix in MP4_FAMILY:
            sample[member] = path.read_bytes()
        elif keep_container:
            prefix = member[: -len("mp4")]  # "" or "src." / "tgt."
            sample[prefix + suffix[1:]] = path.read_bytes()
            meta[prefix.replace(".", "_") + "video_ext"] = suffix[1:]
        else:
            sample[member] = transcode_to_mp4(path)
            meta["transcoded"] = True
    if rec.probe_duration and "duration" not in meta:
        duration = probe_duration(next(iter(paths.values())))
        if duration is not None:
            if rec.max_duration is not None and duration > rec.max_duration:
                duration = rec.max_duration
                meta["duration_capped"] = True  # the file runs longer; only its first max_duration s are annotated
            meta["duration"] = round(duration, 3)
            _clip_to_duration(meta)
    sample["json"] = meta
    return sample


def _write_shard(job: dict) -> dict:
    samples, failed = [], []
    for rec, paths in job["items"]:
        try:
            samples.append(_sample(rec, paths, job["keep_container"]))
        except Exception as e:  # a corrupt or unreadable file: report it, keep converting the rest
            failed.append(f"{rec.key}\t{type(e).__name__}: {e}")
    write_tar(Path(job["out_dir"]) / shard_name("shard", job["shard"]), samples)
    return {"n": len(job["items"]), "written": len(samples), "failed": failed}


def write_output(output: Output, videos: Path, out: Path, *, shard_size: int, workers: int, keep_container: bool,
                 progress: bool, info: dict) -> dict:
    out_dir = out / output.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("shard-*.tar*"):
        old.unlink()
    _unique_keys(output.records)

    present, missing = [], []
    for rec in output.records:
        paths = {member: find_video(videos, cands) for member, cands in rec.videos.items()}
        lost = [cands[0] for member, cands in rec.videos.items() if paths[member] is None]
        if lost:
            missing.extend(lost)
        else:
            present.append((rec, paths))
    (out_dir / "missing.txt").write_text("".join(f"{m}\n" for m in missing))
    if missing:
        shown = ", ".join(missing[:10]) + (", …" if len(missing) > 10 else "")
        warnings.warn(f"{output.name}: {len(missing)} of {len(output.records)} sample(s) skipped, video(s) not found "
                      f"under {videos}: {shown} (all listed in {out_dir / 'missing.txt'})")

    jobs = [{"out_dir": str(out_dir), "shard": i, "keep_container": keep_container,
             "items": present[i * shard_size:(i + 1) * shard_size]}
            for i in range((len(present) + shard_size - 1) // shard_size)]
    results = []
    with tqdm(total=len(present), unit="video", desc=output.name, disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_write_shard(job))
                bar.update(results[-1]["n"])
        else:
            with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for res in pool.imap_unordered(_write_shard, jobs):
                    results.append(res)
                    bar.update(res["n"])
    failed = sorted(f for r in results for f in r["failed"])
    if failed:
        (out_dir / "failed.txt").write_text("".join(f"{f}\n" for f in failed))
        warnings.warn(f"{output.name}: {len(failed)} video(s) could not be read and were skipped "
                      f"(listed in {out_dir / 'failed.txt'})")
    meta = {**info, "split": output.name, "annotated": len(output.records),
            "count": sum(r["written"] for r in results), "missing": len(missing), "failed": len(failed),
            "shard_size": shard_size, "num_shards": len(jobs), "shards": brace_pattern(out_dir, "shard", len(jobs))}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def convert(fmt: str, annotations, videos, out, *, split: str | None = None, workers: int = 1,
            shard_size: int = 1000, keep_container: bool = False, progress: bool = True, **options) -> list[dict]:
    """Parse `annotations` with the FORMAT's parser and write every output split; returns each split's meta."""
    from data_tools.converters import FORMATS

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    videos, out = Path(videos), Path(out)
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos {videos} is not a folder")
    if isinstance(annotations, (list, tuple)):
        if len(annotations) > 1 and fmt != "msrvtt":
            raise ValueError(f"{fmt} takes one --annotations file, got {len(annotations)}: "
                             f"{', '.join(map(str, annotations))}")
        annotations = list(annotations) if len(annotations) > 1 else annotations[0]
    outputs = FORMATS[fmt](annotations, split=split, **options)
    info = {"format": fmt, "annotations": str(annotations) if not isinstance(annotations, list) else
            [str(a) for a in annotations], "videos": str(videos)}
    return [write_output(o, videos, out, shard_size=shard_size, workers=workers, keep_container=keep_container,
                         progress=progress, info=info) for o in outputs]


def main(argv: list[str] | None = None) -> list[dict]:
    from data_tools.converters import FORMATS

    p = argparse.ArgumentParser(prog="python -m data_tools.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=sorted(FORMATS))
    p.add_argument("--annotations", required=True, nargs="+",
                   help="the official annotation file (json, jsonl, csv or txt); msrvtt takes several json files "
                        "(train_val_videodatainfo.json test_videodatainfo.json)")
    p.add_argument("--videos", required=True, help="local folder holding the videos")
    p.add_argument("--out", required=True, help="output folder; shards go to OUT/<split>/")
    p.add_argument("--split", default=None, help="split name (and, for msrvtt, the json split to select)")
    p.add_argument("--split-csv", default=None, help="msrvtt: MSRVTT_train.9k.csv or MSRVTT_JSFUSION_test.csv")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--keep-container", action="store_true",
                   help="store non-mp4 videos as they are ({key}.webm, …) instead of transcoding them to mp4")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    options = {"split_csv": a.split_csv} if a.split_csv else {}
    metas = convert(a.format, a.annotations, a.videos, a.out, split=a.split, workers=a.workers,
                    shard_size=a.shard_size, keep_container=a.keep_container, progress=not a.no_progress, **options)
    for m in metas:
        print(json.dumps({k: m[k] for k in ("split", "count", "missing", "failed", "shards")}))
    return metas


if __name__ == "__main__":
    main()
