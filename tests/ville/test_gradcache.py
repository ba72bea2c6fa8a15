"""Gradient caching (ville/gradcache.py): the loss and every parameter gradient of the chunked computation equal the
unchunked one (the model's own multi-task forward), and with dropout the re-run reproduces the first pass."""
from __future__ import annotations

import pytest
import torch
from conftest import frames, tiny_cfg

from ville import ViLLE
from ville.gradcache import contrastive_loss_cached, grad_cache, split
from ville.losses import LossCfg

TEXTS = ["a red circle", "a blue square moves", "a green star", "the purple triangle grows", "a yellow star",
         "a red square shrinks"]


def _model(lora_dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = tiny_cfg("gemma2", lora=lora_dropout > 0)
    cfg.llm.lora.dropout = lora_dropout
    model = ViLLE(cfg).train()
    with torch.no_grad():  # LoRA's B starts at zero, which would hide its dropout from the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("chunk", [1, 4])
def test_equals_unchunked_multitask_loss(chunk, one_thread):
    """Retrieval task (InfoNCE over every prefix length + halting) through ViLLE.forward vs gradient caching."""
    model = _model()
    cfg = LossCfg(halting_min_batch=4)
    fr, groups = frames(len(TEXTS), seed=5), torch.tensor([1, 2, 3, 4, 5, 1])  # clips 0 and 5 share a group
    ref, ref_comps = model({"retrieval": {"frames": fr, "text": TEXTS, "group": groups}}, cfg)
    ref.backward()
    ref_grads = _grads(model)
    loss, comps = contrastive_loss_cached(model, cfg, fr, TEXTS, groups, chunk)
    grads = _grads(model)
    assert "halting" in comps  # the halting term is part of what is compared
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert comps["contrastive"] == pytest.approx(ref_comps["contrastive_retrieval"], rel=1e-5)
    assert grads.keys() == ref_grads.keys() and "logit_scale" in grads and "stop_step_bias" in grads
    for name, g in ref_grads.items():
        # fp32 (the fused InfoNCE takes no fp64): the two orders of summation differ by ~1e-6 of a tensor's largest
        # entry (measured: at most 1.2e-6); a wrong chunk offset or a missing replay is off by O(1) of it.
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_dropout_is_replayed(one_thread):
    """With LoRA dropout active, gradient caching equals encoding the same chunks one after another with graphs
    (same RNG stream) and back-propagating the loss through the concatenation; the stream continues afterwards as
    after one pass."""
    model = _model(lora_dropout=0.3)
    assert model.llm.training
    fr = frames(4, seed=6)
    texts = TEXTS[:4]

    def loss_fn(video, text):
        return (video.square().sum(-1) * text.sum(-1)).sum() + model.logit_scale * video.sum()

    def video(x):
        return model.video_embed_steps(x, k=2).per_step[:, -1]

    torch.manual_seed(11)
    v = torch.cat([video(c) for c in split(fr, 2)])
    t = torch.cat([model.text_embed_train(c) for c in split(texts, 2)])
    ref = loss_fn(v, t)
    ref.backward()
    ref_grads, ref_next = _grads(model), torch.rand(3)

    torch.manual_seed(11)
    loss = grad_cache([video, model.text_embed_train], [split(fr, 2), split(texts, 2)], loss_fn)
    grads, nxt = _grads(model), torch.rand(3)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    assert any("lora" in n for n in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(nxt, ref_next)

    torch.manual_seed(12)  # and the masks did matter: another stream gives another loss
    assert not torch.allclose(grad_cache([video, model.text_embed_train], [split(fr, 2), split(texts, 2)], loss_fn),
                              ref.detach())


def test_bad_chunk_is_named():
    with pytest.raises(ValueError, match="train.contrastive_chunk"):
        split([1, 2], 0)


@pytest.mark.parametrize("chunk,grad_scale", [(2, 1.0), (5, 0.5)])
def test_caption_step_through_multitask_loss_equals_unchunked(chunk, grad_scale, one_thread, monkeypatch):
    """`train.contrastive_chunk`: the caption task's LM + contrastive + halting step through multitask_loss with
    gradient caching and the LM term in chunks (their gradients accumulated inside, the rest by the caller's backward of the total) gives the
    loss and every gradient of the plain step; `grad_scale` (1 / grad_accum) scales both parts alike."""
    from ville.losses import multitask_loss

    model = _model()
    cfg = LossCfg(halting_min_batch=4)
    batch = {"caption": {"frames": frames(len(TEXTS), seed=7), "prompt": ["describe the video"] * len(TEXTS),
                         "target": TEXTS, "keys": ["a", "b", "c", "d", "e", "a"]}}
    ref, ref_comps = model(batch, cfg)
    (ref * grad_scale).backward()
    ref_grads = _grads(model)
    from ville import gradcache

    calls, lm_sizes = [], []
    monkeypatch.setattr(gradcache, "grad_cache", lambda *a, **k: calls.append(a[1]) or grad_cache(*a, **k))
    lm_loss = model.lm_loss
    monkeypatch.setattr(model, "lm_loss", lambda fr, pr, tg, **k: lm_sizes.append(len(tg)) or lm_loss(fr, pr, tg, **k))
    loss, comps = multitask_loss(model, batch, cfg, contrastive_chunk=chunk, grad_scale=grad_scale)
    assert [len(c) for c in calls[0]] == [-(-len(TEXTS) // chunk)] * 2  # both towers ran in chunks
    assert max(lm_sizes) <= chunk and sum(lm_sizes) == len(TEXTS)  # and so did the LM term of the same captions
    assert not loss.requires_grad  # every term was back-propagated inside, as the trainer expects
    grads = _grads(model)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert comps.keys() == ref_comps.keys()
    for k in ("lm_caption", "contrastive_caption", "halting_caption"):
        assert comps[k] == pytest.approx(ref_comps[k], rel=1e-5), k
    assert grads.keys() == ref_grads.keys() and "logit_scale" in grads
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_lm_loss_in_chunks_equals_the_whole_batch(one_thread):
    """lm_loss_cached (chunks of 4 and 2 of 6 captions of different lengths, weight 0.5): the loss and every
    gradient of 0.5 * lm_loss on the whole batch."""
    from ville.gradcache import lm_loss_cached

    model = _model()
    fr, prompts = frames(len(TEXTS), seed=8), ["describe the video"] * len(TEXTS)
    ref = model.lm_loss(fr, prompts, TEXTS)
    (0.5 * ref).backward()
    ref_grads = _grads(model)
    loss = lm_loss_cached(model, fr, prompts, TEXTS, 4, weight=0.5)
    grads = _grads(model)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)
