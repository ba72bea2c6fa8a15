"""Deterministic WebDataset shard writing and in-process mp4 encoding, shared by the generator and the converters.

A shard is a plain tar whose members are `{key}.{ext}`; WebDataset groups consecutive members by key (everything
before the first dot of the basename), so keys must not contain dots (`safe_key`). Every byte of a shard depends
only on the samples given: fixed member order (extensions sorted), fixed mtime/uid/gid/uname/gname/mode, GNU tar
format. Same samples in → same file hash out, which is what the generator's determinism test checks.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

TAR_MTIME = 1_700_000_000  # fixed and non-zero: some tar readers warn on a zero mtime
SHARD_DIGITS = 6


def safe_key(name: str) -> str:
    """A WebDataset-safe key: dots would split the key from the extension, slashes would make folders."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", name)
    return key or "_"


def encode_json(obj) -> bytes:
    # Sorted keys and fixed separators: the JSON bytes depend on content only, not on dict insertion order.
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _member_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return encode_json(value)
    raise TypeError(f"shard member must be bytes, str, dict or list, got {type(value).__name__}")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


def brace_pattern(out_dir: str | os.PathLike, prefix: str, num_shards: int) -> str:
    """`DIR/shard-{000000..000009}.tar`, the form webdataset and braceexpand read; one shard has no braces."""
    if num_shards <= 0:
        return ""
    last = f"{num_shards - 1:0{SHARD_DIGITS}d}"
    if num_shards == 1:
        return str(Path(out_dir) / f"{prefix}-{last}.tar")
    return str(Path(out_dir) / f"{prefix}-{{{0:0{SHARD_DIGITS}d}..{last}}}.tar")


def write_tar(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write one shard. Each sample is `{"__key__": key, ext: bytes|str|dict, ...}`; members are written in sorted
    extension order. Written to a temporary name and renamed, so a killed job never leaves a truncated shard under
    the final name. Returns the number of samples written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    seen: set[str] = set()
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if key != safe_key(key):
                raise ValueError(f"key {key!r} is not WebDataset-safe (letters, digits, '_' and '-' only)")
            if key in seen:
                raise ValueError(f"duplicate key {key!r} in shard {path}")
            seen.add(key)
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = _member_bytes(sample[ext])
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(data))
            n += 1
    os.replace(tmp, path)
    return n


class ShardWriter:
    """Writes samples into `out_dir/{prefix}-000000.tar`, `-000001.tar`, … with `shard_size` samples each.

    Single-process use; parallel producers call `write_tar` on their own shard index instead (see `synth` and
    `convert`), which gives the same bytes as long as each shard's samples are the same.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shard_size = shard_size
        self.num_shards = 0
        self.num_samples = 0
        self._buffer: list[dict] = []

    def write(self, sample: dict) -> None:
        self._buffer.append(sample)
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        write_tar(self.out_dir / shard_name(self.prefix, self.num_shards), self._buffer)
        self.num_shards += 1
        self.num_samples += len(self._buffer)
        self._buffer = []

    def close(self) -> None:
        self._flush()

    @property
    def pattern(self) -> str:
        return brace_pattern(self.out_dir, self.prefix, self.num_shards)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def read_tar(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members by key the way WebDataset does."""
    key, group = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and group:
                yield key, group
                group = {}
            key = k
            group[ext] = tar.extractfile(member).read()
    if group:
        yield key, group


# ----------------------------------------------------------------------------------------------------------- video

# Constant QP with no lookahead: with CRF and x264's default mb-tree, ~2 % of our 64 px clips came out with a few
# different (equally decodable) bytes from one encode to the next in the same process, which breaks byte-identical
# shards. Without rate control, B-frame decisions and scene-cut detection nothing reads the lookahead, and 300 clips
# × 3 encodes were identical. No B-frames also means decode order = display order, which keeps seeking simple.
X264_OPTIONS = {"qp": "20", "preset": "veryfast", "threads": "1", "x264-params": "bframes=0:scenecut=0:rc-lookahead=0"}
# Real videos (converters): CRF keeps big frames at a sane size; mb-tree off for the same reason as above.
X264_TRANSCODE_OPTIONS = {"crf": "23", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}


def _open_x264(container, fps, width: int, height: int, options: dict | None):
    stream = container.add_stream("libx264", rate=fps, options=dict(options or X264_OPTIONS))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    # One thread: x264's output depends on its thread count, and shards must not depend on the machine.
    stream.codec_context.thread_count = 1
    return stream


def encode_mp4(frames: np.ndarray, fps: float, options: dict | None = None) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) to H.264/yuv420p mp4 bytes, deterministically (one encoder thread,
    bitexact muxing). H and W must be even (yuv420p halves the chroma planes)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("cannot encode an empty clip")
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {w}x{h}")
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = _open_x264(container, Fraction(fps).limit_denominator(1001), w, h, options)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def transcode_to_mp4(path: str | os.PathLike, options: dict | None = None) -> bytes:
    """Re-encode any container PyAV can read (webm, mkv, avi, …) to H.264 mp4 bytes, frame by frame (a long video
    never sits in memory decoded). Keeps the frame rate and size (an odd size loses its last row/column, which
    yuv420p cannot hold); the audio is dropped."""
    import av

    buf = io.BytesIO()
    with av.open(str(path)) as src, av.open(buf, "w", format="mp4", options={"fflags": "+bitexact"}) as dst:
        vin = src.streams.video[0]
        rate = Fraction(vin.average_rate or vin.guessed_rate or 25).limit_denominator(1001)
        w, h = vin.codec_context.width // 2 * 2, vin.codec_context.height // 2 * 2
        out = _open_x264(dst, rate, w, h, options or X264_TRANSCODE_OPTIONS)
        for i, frame in enumerate(src.decode(vin)):
            if frame.width != w or frame.height != h:
                frame = frame.reformat(width=w, height=h)
            frame = frame.reformat(format="yuv420p")
            # Renumber frames 0, 1, 2, … in the encoder's 1/fps time base: source timestamps (VFR webm, avi
            # without pts) would otherwise leak irregular spacing or gaps into the mp4.
            frame.pts = i
            frame.time_base = 1 / rate
            dst.mux(out.encode(frame))
        dst.mux(out.encode())
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """All frames of an mp4 (bytes) as uint8 (T, H, W, 3); used by tests and quick checks."""
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frames decoded")
    return np.stack(frames)


def probe_duration(path: str | os.PathLike) -> float | None:
    """Duration in seconds from the container header (stream, else container); None when neither knows it."""
    import av

    with av.open(str(path)) as container:
        if container.streams.video:
            s = container.streams.video[0]
            if s.duration is not None and s.time_base is not None:
                return float(s.duration * s.time_base)
        if container.duration is not None:
            return container.duration / 1_000_000  # av.time_base
    return None
