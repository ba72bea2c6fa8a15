"""Halting supervision: targets on hand-built similarities, E[tokens] against enumeration, the small-batch rule;
progressive detailed captions: sentence prefixes, their losses against a loop reference, completeness targets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build, frames

from ville.losses import (LossCfg, completeness_targets, expected_tokens, halting_targets, multitask_loss,
                          progressive_losses, sentence_prefixes)


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


def test_sentence_prefixes():
    text = "At the start, a red circle is here.  First, it moves left! Then, it grows? Finally, it shrinks."
    assert sentence_prefixes(text, 8) == [
        "At the start, a red circle is here.",
        "At the start, a red circle is here. First, it moves left!",
        "At the start, a red circle is here. First, it moves left! Then, it grows?",
        "At the start, a red circle is here. First, it moves left! Then, it grows? Finally, it shrinks."]
    # More sentences than steps: the last step takes all of them.
    assert sentence_prefixes(text, 2) == [
        "At the start, a red circle is here.",
        "At the start, a red circle is here. First, it moves left! Then, it grows? Finally, it shrinks."]
    assert sentence_prefixes("One sentence, no full stop", 4) == ["One sentence, no full stop"]
    with pytest.raises(ValueError, match="empty detailed caption"):
        sentence_prefixes("  ", 4)


def test_progressive_losses_match_loop_reference():
    """Odd sizes, prefixes padded by repeating the whole caption; fp64 loop reference of both terms."""
    torch.manual_seed(1)
    B, K, D, scale = 5, 4, 7, torch.tensor(6.0)
    n_prefix = torch.tensor([1, 3, 4, 2, 3])
    per_step = F.normalize(torch.randn(B, K, D), dim=-1).requires_grad_()
    prefix_emb = F.normalize(torch.randn(B, K, D), dim=-1)
    for b in range(B):
        prefix_emb[b, n_prefix[b]:] = prefix_emb[b, n_prefix[b] - 1]
    prefix_emb.requires_grad_()
    for kmin in (1, 2):
        con, prog = progressive_losses(LossCfg(), per_step, prefix_emb, n_prefix, scale, kmin)
        q, p, s = per_step.double(), prefix_emb.double(), scale.double()
        ref_con, ref_prog = [], []
        for t in range(kmin - 1, K):
            target = [min(t, int(n) - 1) for n in n_prefix]
            text = torch.stack([p[b, target[b]] for b in range(B)])
            logits = s * q[:, t] @ text.T
            ref_con.append((F.cross_entropy(logits, torch.arange(B)) + F.cross_entropy(logits.T, torch.arange(B))) / 2)
            ref_prog.append(torch.stack([
                -torch.log_softmax(s * p[b, : n_prefix[b]] @ q[b, t], 0)[target[b]] for b in range(B)]).mean())
        ref_con, ref_prog = torch.stack(ref_con).mean(), torch.stack(ref_prog).mean()
        torch.testing.assert_close(con.double(), ref_con, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prog.double(), ref_prog, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(con + 0.5 * prog, (per_step, prefix_emb))
        want = torch.autograd.grad(ref_con + 0.5 * ref_prog, (per_step, prefix_emb))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_completeness_targets():
    assert completeness_targets(torch.tensor([1, 3, 4]), 4).tolist() == [
        [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]


def test_progressive_detailed_captions_feed_halting_alone():
    """With `progressive`, a detailed-caption batch of 3 (under halting_min_batch) feeds progress and halting terms;
    a retrieval batch of the same step does not feed halting."""
    model = build("llama")
    det = {"frames": frames(3), "prompt": ["Describe the video."] * 3, "keys": ["k1", "k2", "k3"],
           "target": ["A red circle. It moves left.", "A blue square.", "A star. It grows. It shrinks."]}
    ret = {"frames": frames(3), "text": ["a red circle", "a blue square", "a green star"],
           "group": torch.tensor([1, 2, 3])}
    loss, comps = multitask_loss(model, {"detailed_caption": det, "retrieval": ret},
                                 LossCfg(progressive=True, halting_min_batch=2))
    assert {"progress_detailed_caption", "halting_detailed_caption", "contrastive_retrieval"} <= comps.keys()
    assert "halting_retrieval" not in comps
    # The halting term is in the total: without it the total drops by exactly that term.
    rest, _ = multitask_loss(model, {"detailed_caption": det, "retrieval": ret},
                             LossCfg(progressive=True, halting=0.0, token_cost=0.0))
    assert float(loss - rest) == pytest.approx(comps["halting_detailed_caption"], rel=1e-4, abs=1e-5)
