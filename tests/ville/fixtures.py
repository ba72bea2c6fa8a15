"""Tiny real shards for the data tests: moving-square clips encoded by PyAV (libx264) in memory, tarred by tarfile."""
from __future__ import annotations

import io
import json
import os
import tarfile

import av
import numpy as np

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow", "purple"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 30),
       "purple": (150, 40, 180)}


def moving_square(num_frames: int, size: int = 32, seed: int = 0, colour: str = "red") -> np.ndarray:
    """(N, size, size, 3) uint8: a square crossing a noisy background; every frame differs from its neighbours."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    side = max(size // 4, 2)
    frames = np.repeat(background[None], num_frames, axis=0)
    for i in range(num_frames):
        x = int((size - side) * i / max(num_frames - 1, 1))
        y = (size - side) // 2 + int(3 * np.sin(i / 2))
        frames[i, y:y + side, x:x + side] = RGB[colour]
    return frames


def encode_mp4(frames: np.ndarray, fps: int = 10, gop: int = 5, bframes: bool = False) -> bytes:
    """H.264 mp4 bytes; `gop` frames between keyframes; B-frames (pts != dts) when asked."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        opts = {"preset": "ultrafast", "threads": "1", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        if bframes:
            opts.update(preset="medium", bframes="2")
        stream.options = opts
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def clip_meta(key: str, seconds: float, seed: int, multi_caption: bool = False) -> dict:
    """Synthetic-set-like annotations: caption(s), detailed caption, 1-3 sequential events, QA, complexity."""
    rng = np.random.default_rng(seed)
    shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
    n_events = int(rng.integers(1, 4))
    cuts = np.linspace(0, seconds, n_events + 1)
    verbs = ["moves right", "grows", "shrinks", "rotates"]
    events = [{"start": round(float(cuts[i]), 3), "end": round(float(cuts[i + 1]), 3),
               "text": f"the {colour} {shape} {verbs[(i + seed) % len(verbs)]}"} for i in range(n_events)]
    caption = f"A {colour} {shape} {verbs[seed % len(verbs)]} ({key})"
    meta = {"key": key, "caption": caption, "duration": seconds, "fps": 10, "complexity": n_events,
            "detailed_caption": "First, " + ". Then, ".join(e["text"] for e in events) + ".",
            "events": events,
            "qa": [{"question": f"what colour is the {shape}?", "answer": colour},
                   {"question": "how many events happen in the video?", "answer": str(n_events)}]}
    # Text-only edits (stage 3's composed task): the edited caption names the new colour / grows -> shrinks.
    other = COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]
    meta["edits"] = [{"type": "colour", "edit": f"make the {colour} {shape} {other}",
                      "caption": caption.replace(f"A {colour} ", f"A {other} ")},
                     {"type": "size", "edit": f"make the {colour} {shape} large",
                      "caption": caption.replace(f"A {colour} ", f"A large {colour} ")}]
    if multi_caption:
        meta["captions"] = [caption, f"a {shape} that is {colour} ({key})"]
    return meta


def make_clip(key: str, seconds: float = 3.0, fps: int = 10, size: int = 32, seed: int = 0, gop: int = 5
              ) -> tuple[bytes, dict]:
    meta = clip_meta(key, seconds, seed, multi_caption=seed % 2 == 1)
    colour = next(c for c in COLOURS if c in meta["caption"])
    return encode_mp4(moving_square(int(seconds * fps), size, seed, colour), fps=fps, gop=gop), meta


def write_shard(path: str, samples: list[tuple[str, dict]]) -> str:
    """samples: (key, {ext: bytes | dict | str}); dicts are written as JSON, str as UTF-8 (so bad JSON is easy)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                if isinstance(data, dict):
                    data = json.dumps(data).encode()
                elif isinstance(data, str):
                    data = data.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1700000000
                tar.addfile(info, io.BytesIO(data))
    return path


def make_dataset(root: str, num_shards: int = 3, per_shard: int = 4, seconds: float = 3.0, size: int = 32,
                 prefix: str = "shard", seed: int = 0) -> tuple[str, list[str]]:
    """Clean clip shards `root/{prefix}-000000.tar`...; returns (brace pattern, keys in order)."""
    os.makedirs(root, exist_ok=True)
    keys = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{s}c{i}"
            mp4, meta = make_clip(key, seconds, size=size, seed=seed + s * per_shard + i)
            samples.append((key, {"mp4": mp4, "json": meta}))
            keys.append(key)
        write_shard(os.path.join(root, f"{prefix}-{s:06d}.tar"), samples)
    return os.path.join(root, f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar"), keys
