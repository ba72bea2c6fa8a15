"""Adaptive length: the embedding tokens embed_video spends per video (histogram, mean, mean per complexity level
and the Spearman correlation with complexity) and its latency per video, measured when the embeddings were computed;
the plot shows tokens against complexity (or their histogram when clips have no complexity).
"""
from __future__ import annotations

import numpy as np

from .. import metrics as M
from .config import EvalCfg


def _spearman_title(rho: float | None, tokens: list[int], comp: list[int]) -> str:
    """The plot's title: rho to 2 decimals, or why it is undefined (`M.spearman` gives None, not a number)."""
    if rho is not None:
        return f"Spearman rho = {rho:.2f}"
    why = ("fewer than 2 clips" if len(tokens) < 2 else "constant tokens" if len(set(tokens)) == 1
           else "constant complexity" if len(set(comp)) == 1 else "not finite")
    return f"Spearman rho undefined ({why})"


def adaptive(model, clips, videos: dict, plot_path: str | None, cfg: EvalCfg) -> dict:
    tokens = [videos[k]["tokens"] for k, _ in clips]
    comp = [m.get("complexity") for _, m in clips]
    has_comp = all(isinstance(c, int) for c in comp)
    ms = np.array([videos[k]["ms"] for k, _ in clips])
    e = model.cfg.embed
    out = {"protocol": f"embed_video with stop threshold {e.stop_threshold}, min {e.min_embed_tokens} / max "
                       f"{e.max_embed_tokens} tokens; latency = wall time of each embed_video batch (batch size "
                       f"{cfg.batch_size}, {cfg.num_frames} frames, vision + prefill + decode + head, decoding "
                       f"excluded) / its videos, on {model.device}, measured when the embeddings were computed "
                       f"(cached results keep their measurement)",
           "num_videos": len(tokens), "mean_tokens": round(float(np.mean(tokens)), 3),
           "histogram": M.histogram(tokens, 1, e.max_embed_tokens),
           "latency_ms_per_video": {"median": round(float(np.median(ms)), 3), "mean": round(float(ms.mean()), 3)}}
    if has_comp:
        rho = M.spearman(comp, tokens)
        out.update(mean_tokens_by_complexity=M.mean_by_group(tokens, comp),
                   spearman_tokens_complexity=None if rho is None else round(rho, 4))
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        if has_comp:  # jittered clips and the mean per complexity level
            means = out["mean_tokens_by_complexity"]
            ax.scatter(np.array(comp) + np.random.default_rng(0).uniform(-0.12, 0.12, len(comp)), tokens, s=10,
                       alpha=0.4, label="clip")
            ax.plot([int(c) for c in means], list(means.values()), "o-", color="C3", label="mean")
            ax.set(xlabel="complexity (events)", ylabel="embedding tokens",
                   title=_spearman_title(rho, tokens, comp))
            ax.legend()
        else:
            ax.hist(tokens, bins=np.arange(0.5, e.max_embed_tokens + 1.5))
            ax.set(xlabel="embedding tokens", ylabel="videos")
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
        out["plot"] = plot_path
    return out
