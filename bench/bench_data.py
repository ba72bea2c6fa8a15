"""Data-loading benchmark: clips/s for decode + frame sampling + collation, seeking vs decoding from the start.

    python bench/bench_data.py [--size 96] [--seconds 1.5]

Test videos are generated on the fly (a square moving over noise, libx264 ultrafast, 25 fps): 10 s and 5 min long,
with a keyframe every 2 s (what a training-data encoder should use) and every 10 s (x264's default keyint of 250).
Each clip is one training example: random frame times (one per segment), decode (ville.video), and every 8 clips a
`collate` into a retrieval batch. "full decode" decodes every frame from the start up to the last target (converting
only the sampled ones), i.e. what a loader without seeking pays. Rates are clips per CPU-second of the one
process (decoding runs on one thread), the best of a few rounds: CI machines are often shared, and wall time
there measures the neighbours. The last row runs the whole loader (tar index, plan,
read, decode, collate) on a shard of 10-s clips, one process.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

import av
import numpy as np
import torch

from ville import data as D
from ville import video as V

FPS = 25


def encode(seconds: float, size: int, gop: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    side, n = size // 4, int(seconds * FPS)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(n):
            img = background.copy()
            x = int((size - side) * (i % 100) / 99)
            img[size // 3:size // 3 + side, x:x + side] = (220, 30, 30)
            img[0, :, 0] = i % 256  # every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def clips_per_second(mp4: bytes, num_frames: int, seek: bool, min_seconds: float, rounds: int = 3,
                     batch: int = 8) -> float:
    """Best of `rounds` rounds (the machine may be shared), each at least min_seconds / rounds and 2 clips long."""
    rng, best = np.random.default_rng(0), 0.0
    for _ in range(rounds):
        examples, clips, start = [], 0, time.process_time()
        while True:
            frames, times = V.decode_clip(mp4, num_frames, rng=rng, seek=seek)
            examples.append({"key": f"c{clips}", "frames": frames, "times": times, "text": "a clip", "group": clips})
            clips += 1
            if len(examples) == batch:
                D.collate(examples, "retrieval")
                examples = []
            elapsed = time.process_time() - start
            if elapsed >= min_seconds / rounds and clips >= 2:
                break
        best = max(best, clips / elapsed)
    return best


def loader_clips_per_second(mp4s: list[bytes], num_frames: int, min_seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard-000000.tar")
        with tarfile.open(path, "w") as tar:
            for i, mp4 in enumerate(mp4s):
                for ext, data in (("json", f'{{"caption": "clip {i}"}}'.encode()), ("mp4", mp4)):
                    info = tarfile.TarInfo(f"c{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        cfg = D.DataCfg(train_shards=path, num_frames=num_frames, shuffle_buffer=16)
        clips, start = 0, None
        for batch in D.make_train_loader(cfg, "retrieval", 8):
            if start is None:  # the first batch includes filling the shuffle buffer
                start = time.process_time()
                continue
            clips += len(batch["keys"])
            if time.process_time() - start >= min_seconds:
                return clips / (time.process_time() - start)


def header() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "uncommitted"
    except OSError:
        commit = "unknown"
    return (f"device: {cpu}, {os.cpu_count()} cores (one process) | python {sys.version.split()[0]}, "
            f"torch {torch.__version__}, av {av.__version__} | commit {commit}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96, help="frame side in pixels")
    p.add_argument("--seconds", type=float, default=1.5, help="minimum measuring time per seeking case")
    args = p.parse_args()
    print(header())
    print(f"videos: {args.size}x{args.size}, {FPS} fps, H.264 ultrafast; clips per CPU-second for sample + decode + "
          "collate\n")
    print("| video | keyframe every | frames | seek (clips/s) | full decode (clips/s) | speed-up |")
    print("|---|---|---|---|---|---|")
    seek_rates = {}
    for gop_seconds in (2, 10):
        for seconds, name in ((10, "10 s"), (300, "5 min")):
            mp4 = encode(seconds, args.size, gop_seconds * FPS)
            for frames in (8, 16):
                fast = clips_per_second(mp4, frames, True, args.seconds)
                slow = clips_per_second(mp4, frames, False, args.seconds if seconds == 10 else 0.0, rounds=2)
                seek_rates[gop_seconds, name, frames] = fast
                print(f"| {name} | {gop_seconds} s | {frames} | {fast:.1f} | {slow:.1f} | {fast / slow:.1f}x |",
                      flush=True)
    print("\ncost of a 5-min clip relative to a 10-s clip, seeking (target: <= 3x):")
    for (gop_seconds, name, frames), rate in seek_rates.items():
        if name == "5 min":
            print(f"  keyframe every {gop_seconds} s, {frames} frames: "
                  f"{seek_rates[gop_seconds, '10 s', frames] / rate:.2f}x")
    mp4s = [encode(10, args.size, 2 * FPS, seed=i) for i in range(16)]
    rate = loader_clips_per_second(mp4s, 8, args.seconds * 2)
    print(f"\nwhole loader (tar -> batch of 8, retrieval, 10-s clips, keyframe every 2 s, 8 frames, num_workers 0): "
          f"{rate:.1f} clips/s")


if __name__ == "__main__":
    main()
