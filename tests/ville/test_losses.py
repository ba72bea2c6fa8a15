"""Halting supervision: targets on hand-built similarities, E[tokens] against enumeration, the small-batch rule."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import build, frames

from ville.losses import LossCfg, expected_tokens, halting_targets, multitask_loss


def test_halting_targets_by_hand():
    """Three samples, two steps, 2-d unit vectors: the target is 1 where the own text beats every other by 0.05."""
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    per_step = F.normalize(torch.tensor([
        [[1.0, 1.0], [1.0, 0.0]],  # step 1 ties texts 0 and 1 (no margin) -> 0; step 2 exact -> 1
        [[0.0, 1.0], [0.0, 1.0]],  # always 1
        [[-1.0, 1.02], [-1.0, 0.9]],  # step 1: 0.697 vs 0.714 for text 1 -> 0; step 2: 0.743 vs 0.669 -> 1
    ]), dim=-1)
    got = halting_targets(per_step, text, margin=0.05)
    assert got.tolist() == [[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]
    # Same group = not a competitor: with samples 0 and 1 grouped, sample 0's step 1 has only text 2 against it.
    got = halting_targets(per_step, text, margin=0.05, groups=torch.tensor([7, 7, 8]))
    assert got[0, 0] == 1.0


def test_expected_tokens_matches_enumeration():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64)
    for kmin in (1, 3):
        p = torch.sigmoid(logits)
        ref = torch.zeros(4, dtype=torch.float64)
        for b in range(4):  # sum over stop step n of n * P(stop exactly at n); no stop before kmin, forced at K
            for n in range(kmin, 6):
                go_on = [1 - p[b, t] if t >= kmin - 1 else 1.0 for t in range(n - 1)]
                stop = 1.0 if n == 5 else p[b, n - 1]
                ref[b] += n * torch.prod(torch.tensor(go_on + [1.0], dtype=torch.float64)) * stop
        torch.testing.assert_close(expected_tokens(logits, kmin).double(), ref, rtol=1e-6, atol=1e-6)  # fp32 inside


def test_small_batches_do_not_feed_halting():
    """A retrieval batch under `halting_min_batch` contributes InfoNCE but no halting term; at the bound it does."""
    model = build("llama")
    b = {"frames": frames(3), "text": ["a red circle", "a blue square", "a green star"],
         "group": torch.tensor([1, 2, 3])}
    _, comps = multitask_loss(model, {"retrieval": b}, LossCfg(halting_min_batch=4))
    assert "contrastive_retrieval" in comps and "halting_retrieval" not in comps
    _, comps = multitask_loss(model, {"retrieval": b}, LossCfg(halting_min_batch=3))
    assert "halting_retrieval" in comps and "stop_target_rate_retrieval" in comps
