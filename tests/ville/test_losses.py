"""Halting supervision: targets on hand-built similarities, E[tokens] against enumeration, the small-batch rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build, frames, tiny_cfg

from ville.losses import (LossCfg, contrastive_loss, count_sentences, expected_tokens, halting_targets, length_targets,
                          localisation_loss, multitask_loss, swapped_texts)


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


def test_length_targets_by_hand():
    """S sentences -> targets 1 from step min(S, K) on; abbreviation-free sentence ends only split at white space."""
    texts = ["At the start, a red circle is on grey. First, it moves left. Finally, it grows.",  # S = 3
             "Only one sentence without a full stop",  # S = 1
             "One. Two. Three! Four? Five. Six.",  # S = 6 > K = 4: stop at K
             "A 1.5 times bigger square."]  # "1.5" is no sentence end: S = 1
    assert [count_sentences(t) for t in texts] == [3, 1, 6, 1]
    assert length_targets(texts, 4).tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]


def test_sentence_targets_feed_halting_from_detailed_captions_only():
    """halting_target=sentences: a detailed-caption batch (of any size) feeds halting with the length targets; a
    retrieval batch feeds only InfoNCE; an unknown halting_target is an error naming the key."""
    model = build("llama")
    cap = {"frames": frames(2), "prompt": ["describe the video.", "describe the video."],
           "target": ["A red circle. It moves left. It grows.", "A blue square."], "keys": ["a", "b"]}
    ret = {"frames": frames(3), "text": ["a red circle", "a blue square", "a green star"],
           "group": torch.tensor([1, 2, 3])}
    cfg = LossCfg(halting_target="sentences", halting_min_batch=64)
    _, comps = multitask_loss(model, {"detailed_caption": cap, "retrieval": ret}, cfg)
    assert "halting_detailed_caption" in comps and "halting_retrieval" not in comps
    K = model.cfg.embed.max_embed_tokens
    kmin = model.cfg.embed.min_embed_tokens
    expect = length_targets(cap["target"], K)[:, kmin - 1:].mean().item()
    assert abs(comps["stop_target_rate_detailed_caption"] - expect) < 1e-6
    with pytest.raises(ValueError, match="loss.halting_target.*'length'"):
        multitask_loss(model, {"retrieval": ret}, LossCfg(halting_target="length"))



def test_localisation_embeds_windows_and_queries_after_the_moment_prompts():
    """localisation: each window after embed.moment_prompt, each query after embed.moment_text_prompt (the prompts
    the moment eval uses), cross-entropy over the query's windows with the padding windows masked; the gradient
    reaches the LLM through the moment prompts' own tokens."""
    model = build("llama").train()
    e = model.cfg.embed
    e.moment_prompt = "Summarize the event in embeddings."
    e.moment_text_prompt = "Summarize the event in one embedding."
    b = {"frames": frames(6).unflatten(0, (2, 3)), "text": ["the red circle moves left", "the square turns blue"],
         "window_mask": torch.tensor([[True, True, False], [True, True, True]])}
    total, comps = multitask_loss(model, {"localisation": b}, LossCfg(localisation=2.0))
    windows = model.video_embed_steps(b["frames"].flatten(0, 1), moment=True).per_step.unflatten(0, (2, 3))
    ref = localisation_loss(LossCfg(), windows, model.text_embed_train(b["text"], moment=True),
                            model.logit_scale.exp().squeeze(0), e.min_embed_tokens, b["window_mask"])
    assert torch.allclose(total, 2.0 * ref, rtol=1e-5) and abs(comps["localisation"] - ref.item()) < 1e-5
    clip_prompts = localisation_loss(LossCfg(), model.video_embed_steps(b["frames"].flatten(0, 1)).per_step
                                     .unflatten(0, (2, 3)), model.text_embed_train(b["text"]),
                                     model.logit_scale.exp().squeeze(0), e.min_embed_tokens, b["window_mask"])
    assert abs(clip_prompts.item() - ref.item()) > 1e-4
    total.backward()
    grad = model.base_llm().get_input_embeddings().weight.grad
    event = model._token_ids(["event"], "t")[0]  # a word only the moment prompts contain
    assert grad is not None and grad[event].abs().sum() > 0

def test_localisation_with_an_isolating_moment_adapter_trains_the_adapter_only():
    """model.moment_adapter (isolate): the localisation term is the same cross-entropy, and its gradient reaches the
    adapter and nothing else (not the temperature, which retrieval shares)."""
    from dataclasses import replace

    from ville import ViLLE
    from ville.config import MomentAdapterCfg

    torch.manual_seed(0)
    model = ViLLE(replace(tiny_cfg("llama"), moment_adapter=MomentAdapterCfg(r=2))).train()
    for p in model.moment_adapter.up.values():
        torch.nn.init.normal_(p, 0, 0.1)
    b = {"frames": frames(6).unflatten(0, (2, 3)), "text": ["the red circle moves left", "the square turns blue"]}
    total, comps = multitask_loss(model, {"localisation": b}, LossCfg(localisation=2.0))
    windows = model.video_embed_steps(b["frames"].flatten(0, 1), moment=True).per_step.unflatten(0, (2, 3))
    ref = localisation_loss(LossCfg(), windows, model.text_embed_train(b["text"], moment=True),
                            model.logit_scale.exp().squeeze(0), model.cfg.embed.min_embed_tokens)
    assert torch.allclose(total, 2.0 * ref, rtol=1e-5)
    total.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded and graded == {n for n, _ in model.moment_adapter.named_parameters(prefix="moment_adapter")}


def test_composed_task_contrasts_the_composed_query_with_the_edited_caption():
    """composed: InfoNCE between embed(video + edit) and the edited caption, equal edited captions are not
    negatives of each other, no halting term; the gradient reaches the LLM through the edit tokens."""
    model = build("llama").train()
    b = {"frames": frames(3), "edit": ["make the red circle blue", "make the red circle large", "make it green"],
         "text": ["a blue circle", "a large red circle", "a blue circle"], "keys": ["a", "a", "b"]}
    total, comps = multitask_loss(model, {"composed": b}, LossCfg(composed=0.5, halting_min_batch=1))
    assert set(comps) == {"contrastive_composed", "logit_scale", "samples", "video_tokens"}
    steps = model.composed_embed_steps(b["frames"], b["edit"])
    groups = torch.tensor([0, 1, 0])
    ref = contrastive_loss(LossCfg(), steps.per_step, model.text_embed_train(b["text"]), model.logit_scale.exp(),
                           model.cfg.embed.min_embed_tokens, groups=(groups, groups))
    assert torch.allclose(total, 0.5 * ref, rtol=1e-5) and abs(comps["contrastive_composed"] - ref.item()) < 1e-5
    total.backward()
    emb = model.base_llm().get_input_embeddings().weight.grad
    edit_only = model._token_ids(["make"], "t")[0]  # a word only the edits contain
    assert emb is not None and emb[edit_only].abs().sum() > 0


COLOURS, SHAPES = ["red", "blue", "green"], ["circle", "square", "star"]


def test_swapped_texts_by_hand():
    """One copy per class holding two different words; the first two (reading order) exchanged at every occurrence,
    case kept; words of no class, one distinct word of a class or sub-words are left alone."""
    classes = [COLOURS, SHAPES]
    assert swapped_texts("A red circle near a blue square.", classes) == [
        "A blue circle near a red square.", "A red square near a blue circle."]
    assert swapped_texts("Red stars, a green star and a blue circle; the red one turns blue.", classes) == [
        "Green stars, a red star and a blue circle; the green one turns blue.",  # red <-> green; "stars" is no star
        "Red stars, a green circle and a blue star; the red one turns blue."]
    assert swapped_texts("a red circle grows on a reddish background", classes) == []
    assert swapped_texts("a red circle near a red square", [COLOURS]) == []


def test_swap_loss_against_a_float64_reference():
    """loss.swap: the term is mean over (copy, trained step) of softplus(scale * (cos(v, copy) - cos(v, caption))),
    recomputed here in float64 from the model's own embeddings; a batch without any pair logs 0; off by default."""
    model = build("llama").eval()
    texts = ["a red circle near a blue square", "a green star", "a blue star near a red circle"]
    b = {"frames": frames(3), "text": texts, "group": torch.tensor([1, 2, 3])}
    cfg = LossCfg(swap=0.5, swap_classes=[COLOURS, SHAPES], halting=0.0, token_cost=0.0)
    total, comps = multitask_loss(model, {"retrieval": b}, cfg)
    with torch.no_grad():
        steps = model.video_embed_steps(b["frames"]).per_step.double()
        caption = model.text_embed_train(texts).double()
        scale = model.logit_scale.exp().double().item()
        terms = []
        for i, text in enumerate(texts):
            for copy in swapped_texts(text, [COLOURS, SHAPES]):
                neg = model.text_embed_train([copy]).double()[0]
                for t in range(model.cfg.embed.min_embed_tokens - 1, steps.shape[1]):
                    v = steps[i, t]
                    terms.append(F.softplus(scale * (v @ neg - v @ caption[i])))
    assert len(terms) == 4 * (steps.shape[1] - model.cfg.embed.min_embed_tokens + 1)
    ref = torch.stack(terms).mean().item()
    assert abs(comps["swap_retrieval"] - ref) < 1e-5
    assert abs(total.item() - (comps["contrastive_retrieval"] + 0.5 * ref)) < 1e-5
    _, comps = multitask_loss(model, {"retrieval": {**b, "text": ["a green star"] * 3}}, cfg)
    assert comps["swap_retrieval"] == 0.0
    _, comps = multitask_loss(model, {"retrieval": b}, LossCfg())
    assert not any(k.startswith("swap") for k in comps)
