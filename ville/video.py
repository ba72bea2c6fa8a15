"""Video: frame times and windows of a clip, and decoding the frames at those times by seeking, not decoding all.

`sample_times` (one time per segment: centres for evaluation, random offsets for training), `sliding_windows` and
`window_iou` (localisation candidates), then the decoders: `decode_frames` (any times), `decode_clip` (sampled over
a clip or a window), `decode_windows` (several windows in one pass), `decode_window` (evaluation), `decode_all`.

Time is in seconds from the first frame of the video stream (`stream.start_time`). The frame *at* time t is the last
frame whose presentation timestamp is <= t (the frame on screen at t); before the first frame it is the first frame,
after the last it is the last. `decode_all` and the seeking path apply this same rule, so they return the same pixels
and timestamps (tests/ville/test_data.py checks it, B-frames included).

Seeking: the mp4 index (`stream.index_entries`, read from the moov box when the file is opened, so it costs nothing)
gives the keyframes. For each target time, in increasing order, we seek to the keyframe before it only when that
keyframe lies beyond the frame we have decoded up to; otherwise we keep decoding forward. So a target costs at most
one GOP of decoding, and targets closer together than a GOP share one decode run. The cost of T frames therefore
grows with T and the keyframe interval, not with the video length: data should be encoded with keyframes every
1-2 s (`-g 2*fps`); with x264's default (250 frames) a 10-s clip is a single GOP and seeking cannot help.
Index timestamps are decode times; with B-frames a keyframe is shown a fixed delay later, which we estimate from the
first index entry. The estimate only steers the seek-or-continue choice: whenever a seek lands after its target we
decode from the start instead, so correctness never depends on it. Streams without an index decode sequentially.

Sources are mp4 bytes (tar members), paths, or binary file objects. Frames are uint8 numpy arrays (T, H, W, 3) in RGB,
optionally resized to `size` x `size` by swscale while converting from YUV (the only resize in the pipeline).
"""
from __future__ import annotations

import bisect
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Union

import av
import numpy as np

Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]


class VideoDecodeError(ValueError):
    """The video cannot be opened or decoded (empty, not a video, corrupt packets, no frames)."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    fps: float  # average frame rate (0.0 when the container does not say)
    num_frames: int  # frames the container declares (0 when unknown)
    width: int
    height: int


def sample_times(t0: float, t1: float, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """`num_frames` times in [t0, t1): one per equal segment, at its centre (rng None: evaluation) or at a random
    offset inside it (training)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    span = max(float(t1) - float(t0), 0.0)
    offsets = np.full(num_frames, 0.5) if rng is None else rng.random(num_frames)
    return float(t0) + (np.arange(num_frames) + offsets) * (span / num_frames)


def sliding_windows(duration: float, scales: Sequence[float], stride: float) -> np.ndarray:
    """Candidate windows (N, 2) in seconds: for each scale s, windows of length s * duration starting every
    stride * length, plus one flush with the end; sorted, duplicates removed."""
    rows = []
    for scale in scales:
        length = scale * duration
        if length <= 0:
            continue
        step = max(stride * length, 1e-6)
        starts = list(np.arange(0.0, duration - length + 1e-9, step))
        if not starts or starts[-1] + length < duration - 1e-6:
            starts.append(max(duration - length, 0.0))
        rows += [(s, s + length) for s in starts]
    if not rows:
        return np.zeros((0, 2))
    return np.unique(np.round(np.array(rows, dtype=np.float64), 6), axis=0)


def window_iou(windows: np.ndarray, target: Sequence[float]) -> np.ndarray:
    """Temporal IoU of each window (N, 2) with one [start, end]."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    inter = np.clip(np.minimum(windows[:, 1], target[1]) - np.maximum(windows[:, 0], target[0]), 0, None)
    union = (windows[:, 1] - windows[:, 0]) + (target[1] - target[0]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class _Video:
    """One opened container; closes it on exit."""

    def __init__(self, source: Source):
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise VideoDecodeError("empty video (0 bytes)")
            source = io.BytesIO(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise VideoDecodeError(f"no such video file: {os.fspath(source)!r}")
            if os.path.getsize(source) == 0:
                raise VideoDecodeError(f"empty video file: {os.fspath(source)!r}")
        try:
            self.container = av.open(source, mode="r", metadata_errors="ignore")
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoDecodeError(f"cannot open video: {e}") from e
        if not self.container.streams.video:
            self.container.close()
            raise VideoDecodeError("no video stream")
        self.stream = s = self.container.streams.video[0]
        # One decoding thread: loaders parallelise across worker processes, and decoder threads would only
        # oversubscribe the cores (frame threads also have to refill after every seek).
        s.codec_context.thread_count = 1
        self.tb = float(s.time_base) if s.time_base else 1e-6
        self.start = int(s.start_time) if s.start_time is not None else 0
        fps = float(s.average_rate) if s.average_rate else 0.0
        if s.duration:
            duration = s.duration * self.tb
        elif self.container.duration:
            duration = self.container.duration / 1e6
        else:
            duration = (s.frames / fps) if (s.frames and fps) else 0.0
        ctx = s.codec_context
        self.info = VideoInfo(float(duration), fps, int(s.frames or 0), int(ctx.width), int(ctx.height))
        entries = s.index_entries
        self.keyframes: list[int] | None = None
        if len(entries):
            delay = max(self.start - entries[0].timestamp, 0)  # B-frame reorder delay, see module docstring
            self.keyframes = sorted(e.timestamp + delay for e in entries if e.is_keyframe)

    def __enter__(self) -> "_Video":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    def ticks(self, t: float) -> int:
        return self.start + int(round(t / self.tb))

    def seconds(self, pts: int) -> float:
        return (pts - self.start) * self.tb

    def _convert(self, frame: av.VideoFrame, size: int | None) -> np.ndarray:
        if size is None:
            return frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="rgb24", width=size, height=size)

    def _run_from(self, target: int | None):
        """A fresh decode run: from the keyframe before `target` (seek) or from the start (None)."""
        self.container.seek(self.start if target is None else target, stream=self.stream, backward=True,
                            any_frame=False)
        return self.container.decode(self.stream)

    def _keyframe_between(self, lo: int, hi: int) -> bool:
        """Is there a keyframe k with lo < k <= hi? (Then seeking to hi skips decoding from lo to k.)"""
        i = bisect.bisect_right(self.keyframes, lo)
        return i < len(self.keyframes) and self.keyframes[i] <= hi

    def frames_at(self, times: np.ndarray, size: int | None, seek: bool) -> tuple[np.ndarray, np.ndarray]:
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        if len(times) == 0:
            raise ValueError("no times to decode")
        targets = sorted({self.ticks(t) for t in times})
        picked: dict[int, tuple[int, np.ndarray]] = {}  # target tick -> (frame pts, pixels)
        seekable = seek and self.keyframes is not None
        i, fresh, force_start = 0, True, False
        try:
            while i < len(targets):
                jump = seekable and not force_start and self._keyframe_between(self.start, targets[i])
                seek_to = targets[i] if jump else None
                run = self.container.decode(self.stream) if fresh and not jump else self._run_from(seek_to)
                fresh = False
                i, force_start = self._decode_run(run, targets, i, picked, size, seekable, jump)
                run.close()
        except av.FFmpegError as e:
            raise VideoDecodeError(f"decoding failed: {e}") from e
        out = [picked[self.ticks(t)] for t in times]
        return np.stack([p for _, p in out]), np.array([self.seconds(pts) for pts, _ in out])

    def _decode_run(self, run, targets: list[int], i: int, picked: dict, size: int | None, seekable: bool,
                    seeked: bool) -> tuple[int, bool]:
        """Decode forward, answering targets[i:], until all are answered or a seek to a later keyframe pays off.
        Returns (next unanswered target, whether the next run must start from the beginning)."""
        prev = None
        for frame in run:
            pts = frame.pts
            if pts is None:
                raise VideoDecodeError("frame without a timestamp")
            if pts > targets[i]:
                if prev is None and seeked:
                    return i, True  # the seek landed after its target: decode this one from the start
                answer = prev if prev is not None else frame  # a target before the first frame gets the first
                pixels = self._convert(answer, size)
                while i < len(targets) and pts > targets[i]:
                    picked[targets[i]] = (answer.pts, pixels)
                    i += 1
                if i == len(targets) or (seekable and self._keyframe_between(pts, targets[i])):
                    return i, False
            prev = frame
        if prev is None:
            raise VideoDecodeError("no frames decoded")
        pixels = self._convert(prev, size)  # end of stream: the last frame answers every remaining target
        for t in targets[i:]:
            picked[t] = (prev.pts, pixels)
        return len(targets), False


def probe(source: Source) -> VideoInfo:
    """Duration, frame rate, frame count and size from the container header (no decoding)."""
    with _Video(source) as v:
        return v.info


def decode_frames(source: Source, times, *, size: int | None = None, seek: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Frames shown at `times` (seconds, any order, repeats allowed).

    Returns frames uint8 (N, H, W, 3) (H = W = size when given) and their own timestamps float64 (N,), in the order
    of `times`. `seek=False` decodes every frame from the start (same result, for benchmarks and checks).
    """
    with _Video(source) as v:
        return v.frames_at(times, size, seek)


def decode_clip(source: Source, num_frames: int, *, window: tuple[float, float] | None = None,
                rng: np.random.Generator | None = None, size: int | None = None, seek: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """`num_frames` frames sampled over `window` (default: the whole video) by `sample_times` (uniform when rng is
    None, random offsets in each segment otherwise). Returns (frames (T, H, W, 3) uint8, times (T,) seconds)."""
    with _Video(source) as v:
        t0, t1 = window if window is not None else (0.0, v.info.duration)
        return v.frames_at(sample_times(t0, t1, num_frames, rng), size, seek)


def decode_windows(source: Source, windows, num_frames: int, *, rng: np.random.Generator | None = None,
                   size: int | None = None, seek: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`num_frames` frames sampled in each of `windows` (W, 2) seconds, all in one seeking pass over the file.
    Returns (frames (W, T, H, W, 3) uint8, times (W, T) seconds)."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    wanted = np.concatenate([sample_times(t0, t1, num_frames, rng) for t0, t1 in windows])
    with _Video(source) as v:
        frames, times = v.frames_at(wanted, size, seek)
    return frames.reshape(len(windows), num_frames, *frames.shape[1:]), times.reshape(len(windows), num_frames)


def decode_window(source: Source, t0: float, t1: float, num_frames: int, *, size: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation view of the window [t0, t1]: `num_frames` frames at segment centres."""
    return decode_clip(source, num_frames, window=(t0, t1), size=size)


def decode_all(source: Source, *, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every frame in presentation order: (frames (N, H, W, 3) uint8, times (N,) seconds)."""
    with _Video(source) as v:
        frames, pts = [], []
        try:
            for frame in v.container.decode(v.stream):
                if frame.pts is None:
                    raise VideoDecodeError("frame without a timestamp")
                frames.append(v._convert(frame, size))
                pts.append(frame.pts)
        except av.FFmpegError as e:
            raise VideoDecodeError(f"decoding failed: {e}") from e
        if not frames:
            raise VideoDecodeError("no frames decoded")
        return np.stack(frames), np.array([v.seconds(p) for p in pts])
