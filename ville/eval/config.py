"""evaluate()'s options (`EvalCfg`; each is also a command-line flag) and the task names. Standard library
only, so the command line parses its arguments before torch is imported."""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("retrieval", "rerank", "moment", "qa", "composed", "long_text", "adaptive", "binding")
KS = (1, 5, 10)


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EvalCfg:
    """evaluate()'s options; each is also a command-line flag (`max_clips` -> `--max-clips`)."""
    tasks: tuple = TASKS
    split: str = _opt("test", "clip split: test, compositional, val, ...")
    max_clips: int | None = _opt(None, "only the first N clips of the split (and the first N composed triplets)")
    num_frames: int | None = _opt(None, "frames per clip / window (default: the model's max_frames)")
    batch_size: int = _opt(8, "clips (or texts, questions) per model call")
    window_batch_size: int = _opt(40, "moment windows per model call (a video's windows share their frames' tower "
                                      "pass; one call for the default 40 windows of a clip)")
    frame_size: int | None = _opt(None, "decode at this square size (default: the vision tower's input size)")
    dual_softmax: bool = _opt(False, "also report dual-softmax retrieval (labelled as such)")
    dual_softmax_scale: float | None = _opt(None, "dual-softmax temperature (default: the model's logit scale)")
    rerank_k: int = _opt(10, "the matching head re-ranks each query's top k")
    rerank_fusion: float | None = _opt(None, "stage 2 orders the top k by scale * cosine + W * score instead of the "
                                             "score alone (choose W on val)")
    rerank_score: str = _opt("match", "the re-ranking score: 'match' (logit of the matching head's probability) or "
                                      "'lm' (the caption's mean log-probability per token given the video: "
                                      "generative matching)")
    moment_scales: tuple = _opt((0.1, 0.2, 0.3, 0.5, 0.75, 1.0), "window lengths, fractions of the duration")
    moment_stride: float = _opt(0.5, "window step, fraction of the window length")
    nms_threshold: float = _opt(0.5, "temporal NMS: drop windows with IoU > this with a better one")
    moment_score: str = _opt("cosine", "window scores: 'cosine' (text-window), or 'zscale' (that cosine standardised "
                                       "among the query's windows of the same length; choose on val)")
    qa_max_new_tokens: int = _opt(8, "greedy answer length limit")
    qa_min_new_tokens: int = _opt(1, "<eos> is not allowed before this many answer tokens (every answer is a word)")
    composed_split: str = _opt("composed", "composed triplets; the gallery is <this>_gallery")
    out: str | None = _opt(None, "results JSON; the plot goes beside it (CLI default: eval_out/<model>-<split>.json)")
    cache_dir: str | None = _opt(None, "embedding cache (default: cache/ beside --out; '' disables caching)")
    progress: bool = True
