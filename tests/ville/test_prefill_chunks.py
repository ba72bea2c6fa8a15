"""Prefill in row slices (`model.prefill_tokens_per_chunk`, ville/model.py `_prefill`, issue 23 item 2): the slices
fill one KV cache and give the whole-batch prefill's cache, adaptive embeddings, stop steps and generated text (Llama,
Qwen2, Gemma-2 with its softcap and sliding window), and no prefill forward runs more tokens than the budget."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build, frames

from ville import attention
from ville.model import _DecodeSession

EDITS = ["make it red", "now the square moves to the left side quickly", "x", "turn it over twice", "stop"]
PROMPTS = ["what moves?", "describe the video in many words please", "colour?", "what shape is it", "why"]


def _budget(model, tokens: int) -> None:
    model.cfg.prefill_tokens_per_chunk = tokens


def _spread_stops(model, fr) -> None:
    """A stop_step_bias ramp and a threshold under which the samples of `fr` stop at different steps (the random tiny
    models' stop logits barely move from step to step). The bias only shifts the stop logits, so a fixed-length
    decode's logits tell where each sample will stop."""
    z = torch.logit(model.embed_video(fr, num_tokens=model.cfg.embed.max_embed_tokens).stop_probs.double())
    ramp = torch.arange(z.shape[1]) * (z[:, 0].max() - z[:, 0].min()).item() / 3
    with torch.no_grad():
        model.stop_step_bias.copy_(ramp)
    model.cfg.embed.stop_threshold = torch.sigmoid((z + ramp)[:, 2].median()).item()


def _prefill_sizes(model):
    """Records (rows, padded length) of every full-mode (prefill) decoder forward."""
    sizes = []

    def hook(module, args, kwargs):
        if kwargs["ville_state"].mode == "full":
            sizes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    return sizes, model.base_llm().get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def _session(model, fr, per_forward: int) -> _DecodeSession:
    """The decode session of composed prefixes (different lengths), prefilled `per_forward` samples at a time (0: the
    whole batch in one forward)."""
    tokens, _ = model.encode_video(fr)
    prompt = model._token_ids([model.cfg.embed.composed_prompt], "p")[0]
    ids = [e + prompt for e in model._token_ids(EDITS[: fr.shape[0]], "edits")]
    embeds, plens, lens = model._pack(model._video_prefixes(fr, ids, tokens))
    _budget(model, per_forward * embeds.shape[1])
    with torch.no_grad():
        return _DecodeSession(model, embeds, plens, lens, 4)


def test_sliced_prefill_gives_the_whole_batch_cache(family, one_thread):
    """Two rows per forward over 5 samples of different lengths (slices 2, 2, 1): every layer's cache, padding
    positions included, and the last hidden states equal the one-forward prefill's (within fp32 rounding)."""
    model = build(family)
    fr = frames(5, seed=3)
    whole = _session(model, fr, 0)
    L = whole.state.cache_len - 4
    sizes, handle = _prefill_sizes(model)
    sliced = _session(model, fr, 2)
    handle.remove()
    assert sizes == [(2, L), (2, L), (1, L)]
    assert whole.cache_lens.unique().numel() > 1  # samples of different lengths, right-padded
    assert whole.state.cache.keys() == sliced.state.cache.keys()
    for layer, (k, v) in whole.state.cache.items():
        torch.testing.assert_close(sliced.state.cache[layer][0], k)
        torch.testing.assert_close(sliced.state.cache[layer][1], v)
    torch.testing.assert_close(sliced.last_hidden, whole.last_hidden)


@pytest.mark.parametrize("impl", ["eager", "flex", "chunked"])
def test_sliced_prefill_on_every_attention_path(impl, monkeypatch, one_thread):
    """Gemma-2 (soft-cap, sliding window) through each full-mode attention path, one sample per forward: every path
    builds its mask from the slice's own lengths."""
    monkeypatch.setattr(attention, "CHUNK", 16)  # several query blocks per sequence
    model = build("gemma2")
    for m in model.modules():
        if hasattr(getattr(m, "config", None), "ville_attention"):
            m.config.ville_attention = impl
    fr = frames(3, seed=9)
    whole, sliced = _session(model, fr, 0), _session(model, fr, 1)  # 1: one sample per forward
    torch.testing.assert_close(sliced.last_hidden, whole.last_hidden)
    for layer, (k, v) in whole.state.cache.items():
        torch.testing.assert_close(sliced.state.cache[layer][0], k)
        torch.testing.assert_close(sliced.state.cache[layer][1], v)


@pytest.mark.parametrize("per_forward", [1, 2])
def test_embeddings_and_stop_steps_equal_unsliced(family, per_forward, one_thread):
    """Adaptive video and composed embeddings (stop by threshold) with 1 or 2 samples per prefill forward."""
    model = build(family)
    fr = frames(5, seed=5)
    _budget(model, 0)
    _spread_stops(model, fr)
    prompt = model._token_ids([model.cfg.embed.composed_prompt], "p")[0]
    calls = {"video": (lambda: model.embed_video(fr), model._video_prompt_ids(5)),
             "composed": (lambda: model.embed_composed(fr, EDITS),
                          [e + prompt for e in model._token_ids(EDITS, "edits")])}
    for name, (call, ids) in calls.items():
        _budget(model, 0)
        ref = call()
        _budget(model, per_forward * model._pack(model._video_prefixes(fr, ids))[0].shape[1])
        sizes, handle = _prefill_sizes(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the budget holds whole samples: no one-sample warning
            got = call()
        handle.remove()
        assert [r for r, _ in sizes] == [per_forward] * (5 // per_forward) + [1] * (5 % per_forward), name
        assert got.num_tokens.tolist() == ref.num_tokens.tolist() and len(set(ref.num_tokens.tolist())) > 1, name
        # fp32 rounding (torch's default float32 tolerances); bitwise equal when measured (docs/experiments.md)
        torch.testing.assert_close(got.embeddings, ref.embeddings)
        torch.testing.assert_close(got.stop_probs, ref.stop_probs, equal_nan=True)


def test_generation_equals_unsliced(family, one_thread):
    """Greedy text from prompts of different lengths, 2 samples per prefill forward (slices 2, 2, 1)."""
    model = build(family)
    fr = frames(5, seed=7)
    _budget(model, 0)
    ref = model.generate(fr, PROMPTS, max_new_tokens=6)
    L = model._pack(model._video_prefixes(fr, model._token_ids(PROMPTS, "p")))[0].shape[1]
    _budget(model, 2 * L)
    sizes, handle = _prefill_sizes(model)
    got = model.generate(fr, PROMPTS, max_new_tokens=6)
    handle.remove()
    assert [r for r, _ in sizes] == [2, 2, 1]
    assert got == ref and any(ref)


@pytest.mark.parametrize("budget", [1, 130, 300])
def test_no_prefill_forward_exceeds_the_budget(budget, one_thread):
    """Counted by a hook on the decoder: rows x padded length <= budget, except one sample longer than the budget,
    which runs alone after one warning."""
    model = build("llama")
    fr = frames(6, seed=1)
    L = model._pack(model._video_prefixes(fr, model._token_ids(PROMPTS + ["a"], "p")))[0].shape[1]
    _budget(model, budget)
    sizes, handle = _prefill_sizes(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(fr, PROMPTS + ["a"], max_new_tokens=1)
    handle.remove()
    assert sum(r for r, _ in sizes) == 6 and all(length == L for _, length in sizes)
    if budget < L:
        assert [r for r, _ in sizes] == [1] * 6
        assert [str(w.message) for w in caught] == [
            f"model.prefill_tokens_per_chunk={budget} is below one sample's padded length {L}: the prefill runs one "
            f"sample per forward"]
    else:
        assert all(r * length <= budget for r, length in sizes) and not caught
        assert len(sizes) == -(-6 // (budget // L))


def test_negative_budget_is_one_line():
    model = build("llama")
    _budget(model, -1)
    with pytest.raises(ValueError, match=r"^model.prefill_tokens_per_chunk: expected >= 0 \(0 = the whole batch at "
                                         r"once\), got -1$"):
        model.embed_video(frames(1))
