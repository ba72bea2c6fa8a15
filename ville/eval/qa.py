"""Video QA: greedy answers (generated in the clip pass, `common.video_embeddings`) with the training prompt, exact
match after lowercasing and removing punctuation and articles, against the most frequent answer per question type in
the train split.
"""
from __future__ import annotations

import os

from .. import metrics as M
from ..data import QA_PROMPT
from .common import list_clips, qa_items, split_shards
from .config import EvalCfg


def qa(clips, answers: dict, data_dir: str, cfg: EvalCfg) -> dict:
    gold, pred, kinds = [], [], []
    for key, meta in clips:
        for i, q in enumerate(qa_items(meta)):
            gold.append(str(q["answer"]))
            pred.append(answers[f"{key}#{i}"])
            kinds.append(M.question_type(q))
    if not gold:
        return {"protocol": "not available: no clip of the split has `qa`", "num_questions": 0}
    train = os.path.join(data_dir, "train")
    source = "train" if os.path.isdir(train) and any(f.endswith(".tar") for f in os.listdir(train)) else cfg.split
    pool = list_clips(split_shards(data_dir, source)) if source != cfg.split else clips
    majority = M.majority_answers((M.question_type(q), str(q["answer"])) for _, m in pool for q in qa_items(m))
    base = [majority.get(kd, majority.get("*", "")) for kd in kinds]
    hit, base_hit = M.exact_match(pred, gold), M.exact_match(base, gold)
    per_type = {kd: round(100.0 * float(hit[[x == kd for x in kinds]].mean()), 2) for kd in sorted(set(kinds))}
    return {"protocol": f"greedy generation ({cfg.qa_min_new_tokens} to {cfg.qa_max_new_tokens} new tokens: <eos> is "
                        f"masked before the first {cfg.qa_min_new_tokens}) with the training prompt "
                        f"{QA_PROMPT!r}; exact match after lowercasing, removing punctuation and the articles "
                        f"a/an/the; baseline: the most frequent answer per question type (`type`, else the first "
                        f"word) in the {source.upper()} split",
            "num_questions": len(gold), "accuracy": round(100.0 * float(hit.mean()), 2), "per_type": per_type,
            "majority_baseline": round(100.0 * float(base_hit.mean()), 2), "baseline_source": source,
            "examples": [{"pred": p, "answer": g} for p, g in list(zip(pred, gold))[:5]]}
