"""Evaluation: one model, every task, labelled protocols, cached embeddings; single process or torchrun.

    python -m ville.eval MODEL_DIR --data DIR [--out results.json] [--tasks retrieval rerank moment qa composed
        long_text adaptive binding] [--split test|compositional] [--max-clips N] [--num-frames T] [--batch-size B]
        [--dual-softmax] [--rerank-k 10]
    torchrun --nproc-per-node N -m ville.eval ...     (same code; CUDA -> nccl, CPU -> gloo)

In-process: `evaluate(model_or_dir, data_dir, tasks=..., split=..., **options) -> dict` (the results on rank 0,
None on the other ranks); options are the fields of `EvalCfg`.

Flow: the split's clips are listed from the tar indexes (JSON only). Work that needs the model -- video, text,
window and composed embeddings, QA answers, matching scores -- is looked up in the cache first; what is missing is
split across ranks in fixed batches (batch b on rank b % world_size, so every rank's batches are the ones a single
process would form, and the numbers do not depend on the world size), computed, all-gathered and written to the
cache by rank 0. Metrics are computed from the gathered results by rank 0 only (`ville.metrics`, which documents the
formulas and the tie rule; DiDeMo moments by DiDeMo's own rule, other moment sets by QVHighlights'; multi-caption
video-to-text both among all texts and as CLIP4Clip's per-video maximum, each labelled in the output). Cache
files: `CACHE/{model identity}-{split}-{num_frames}-{what}-{frame size}px.safetensors`
(plus `CACHE/{identity}-texts.safetensors`); the identity is the hash of the weights and the config
(`ville.checkpoint.model_identity`) or, for an in-memory model, of its state dict and config, so neither a retrained
model nor an edited stop rule ever reads stale entries.

Layout, in the order a run uses it: `config` (EvalCfg, the task names; no torch), `common` (ranks, cache, clips,
the shared video and text embedding passes), one module per section -- `retrieval` (retrieval, rerank), `moments`,
`qa`, `composed` (composed, long_text), `adaptive`, `binding` (attribute binding on `DIR/binding`, written by
`python -m data_tools.binding`) -- then `runner` (evaluate, format_table) and `__main__` (the
command line). The names below that need torch are imported on first use, so `import ville.eval` and `--help` do
not load torch.
"""
from __future__ import annotations

import importlib

from .config import KS, TASKS, EvalCfg

_LAZY = {"evaluate": "runner", "format_table": "runner", "Cache": "common", "state_identity": "common",
         "main": "__main__"}
__all__ = ["evaluate", "format_table", "main", "EvalCfg", "TASKS", "KS", "Cache", "state_identity"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
