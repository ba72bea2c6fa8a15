"""The model on CPU with tiny configs of three decoder families (Gemma2, Llama, Qwen2)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import build, frames, tiny_cfg

from ville import ViLLE
from ville.config import MomentAdapterCfg
from ville.llm import AttnState

PROMPTS = ["Question: what colour is the circle? Answer:", "Describe", "how many objects move left and then up?"]


def _prefix_suffix_hidden(model, suffix):
    prompt_ids = model._token_ids(PROMPTS[:2], "p")
    prefixes = model._video_prefixes(frames(2), prompt_ids)
    return model._full(prefixes, [suffix, suffix])


def test_prefix_lm_mask(family):
    model = build(family)
    torch.manual_seed(1)
    suffix = torch.randn(5, model.hidden)
    changed = suffix.clone()
    changed[3] = torch.randn(model.hidden) * 3
    with torch.no_grad():
        h1, plens, _ = _prefix_suffix_hidden(model, suffix)
        h2, _, _ = _prefix_suffix_hidden(model, changed)
    for b in range(2):
        p = int(plens[b])
        # the prefix never sees the suffix; suffix positions before the change see only earlier tokens
        torch.testing.assert_close(h1[b, : p + 3], h2[b, : p + 3], rtol=0, atol=1e-6)
        assert (h1[b, p + 3] - h2[b, p + 3]).abs().max() > 1e-3
        assert (h1[b, p + 4] - h2[b, p + 4]).abs().max() > 1e-3


def test_prefix_is_bidirectional(family):
    """Changing the last prompt token changes the hidden states of earlier prefix tokens (not causal)."""
    model = build(family)
    fr = frames(1)
    with torch.no_grad():
        a, plens, _ = model._full(model._video_prefixes(fr, model._token_ids(["red circle"], "p")), None)
        b, _, _ = model._full(model._video_prefixes(fr, model._token_ids(["red square"], "p")), None)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_padding_never_leaks(family):
    """A sample's outputs are the same alone and next to a longer prompt (right padding is masked)."""
    model = build(family)
    fr = frames(2)
    with torch.no_grad():
        alone = model.match_logits(fr[:1], [PROMPTS[1]])
        both = model.match_logits(fr, [PROMPTS[1], PROMPTS[2]])
    torch.testing.assert_close(alone, both[:1], rtol=1e-5, atol=1e-5)


def test_embedding_decode_equals_full_recomputation(family):
    model = build(family)
    fr = frames(3)
    k = 4
    with torch.no_grad():
        model.stop_step_bias.copy_(torch.randn_like(model.stop_step_bias))  # per-step biases: both paths add them
        cached = model.embed_video(fr, num_tokens=k)
        full = model.video_embed_steps(fr, k)
    assert cached.num_tokens.tolist() == [k] * 3
    torch.testing.assert_close(cached.embeddings, full.per_step[:, k - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.stop_probs, torch.sigmoid(full.stop_logits), rtol=1e-5, atol=1e-5)


def _greedy_no_cache(model, fr, prompt, n):
    ids = model._token_ids([prompt], "p")
    out = []
    for _ in range(n):
        prefixes = model._video_prefixes(fr, ids)
        suffix = model._embed_ids(out) if out else None
        h, plens, lens = model._full(prefixes, [suffix] if suffix is not None else None)
        nxt = int(model.lm_logits(h[0, int(lens[0]) - 1]).argmax())
        if nxt == model.eos_id:
            break
        out.append(nxt)
    return model.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_generation_cache_equals_recomputation_and_is_deterministic(family):
    model = build(family)
    fr = frames(3)
    with torch.no_grad():
        gen = model.generate(fr, PROMPTS, max_new_tokens=6)
        again = model.generate(fr, PROMPTS, max_new_tokens=6)
        ref = [_greedy_no_cache(model, fr[i : i + 1], PROMPTS[i], 6) for i in range(3)]
    assert gen == again
    assert gen == ref


def last_prefix_states(model, fr, prompts) -> torch.Tensor:
    """(B, H) hidden state at each sample's last prefix position: the one that predicts the first new token."""
    h, _, lens = model._full(model._video_prefixes(fr, model._token_ids(prompts, "p")), None)
    return h[torch.arange(h.shape[0]), lens - 1]


def test_generation_stops_per_sample_at_eos():
    """Make <eos> the first token for sample 0 only: it returns empty text, the other continues unaffected."""
    model = build("llama")
    fr = frames(2)
    with torch.no_grad():
        head = model.base_llm().get_output_embeddings()
        a, b = last_prefix_states(model, fr, PROMPTS[:2])
        head.weight[model.eos_id] = (a / a.norm() - b / b.norm()) * 200  # high for sample 0, low for sample 1
        out = model.generate(fr, PROMPTS[:2], max_new_tokens=4)
        alone = model.generate(fr[1:], PROMPTS[1:2], max_new_tokens=4)
    assert out[0] == ""
    assert out[1] != "" and out[1] == alone[0]


def test_min_new_tokens_masks_eos():
    """With <eos> rigged to win, min_new_tokens=1 still gives every sample a first token; bad values raise."""
    model = build("llama")
    fr = frames(2)
    with torch.no_grad():
        head = model.base_llm().get_output_embeddings()
        head.weight[model.eos_id] = last_prefix_states(model, fr, PROMPTS[:2]).sum(0) * 200
        assert model.generate(fr, PROMPTS[:2], max_new_tokens=4) == ["", ""]
        out = model.generate(fr, PROMPTS[:2], max_new_tokens=4, min_new_tokens=1)
    assert all(o for o in out)  # a first token other than <eos>
    with pytest.raises(ValueError, match="min_new_tokens"):
        model.generate(fr, PROMPTS[:2], max_new_tokens=2, min_new_tokens=3)


def test_embedding_stop_is_not_the_text_eos():
    """The stop logit reads <eoe> vs <emb>, never the text <eos>; text generation never emits embedding-mode tokens,
    even when their logits dominate (what a halting loss on a shared row did: every answer came out empty)."""
    model = build("llama")
    fr = frames(2)
    with torch.no_grad():
        before = model.generate(fr, PROMPTS[:2], max_new_tokens=4)
        head = model.base_llm().get_output_embeddings()
        last = last_prefix_states(model, fr, PROMPTS[:2])
        big = last.sum(0) * 200
        head.weight[model.eoe_id] = big  # would win every argmax if generation allowed it
        head.weight[model.embed_mode_ids[-1]] = big * 1.01  # <match>
        assert set(model.lm_logits(last).argmax(-1).tolist()) <= set(model.embed_mode_ids)
        assert model.generate(fr, PROMPTS[:2], max_new_tokens=4) == before
        stop = model.video_embed_steps(fr, k=3).stop_logits
        head.weight[model.eos_id] = big * 1.02  # the text EOS now wins: generation ends at once ...
        assert model.generate(fr, PROMPTS[:2], max_new_tokens=4) == ["", ""]
        # ... and the stop logits do not move
        torch.testing.assert_close(model.video_embed_steps(fr, k=3).stop_logits, stop, atol=0, rtol=0)
    assert model.eoe_id != model.eos_id


def test_stop_step_bias_sets_the_stop_step():
    """A bias ladder that forbids stopping before step 3 and forces it there stops every sample at exactly 3; the
    optimiser gives the biases their own learning-rate group (100 x lr by default)."""
    from ville.optim import OptimCfg, build_optimizer

    model = build("llama")
    with torch.no_grad():
        model.stop_step_bias.copy_(torch.tensor([-1e4, -1e4, 1e4, 1e4, 1e4, 1e4]))
        out = model.embed_video(frames(3))
    assert out.num_tokens.tolist() == [3, 3, 3]
    groups = {g["name"]: g for g in build_optimizer(model, OptimCfg(lr=1e-3)).param_groups}
    assert groups["stop"]["lr"] == pytest.approx(0.1) and groups["stop"]["weight_decay"] == 0.0
    assert [p.shape for p in groups["stop"]["params"]] == [model.stop_step_bias.shape]


def test_stop_threshold_extremes(family):
    model = build(family)
    fr = frames(2)
    assert model.embed_video(fr, stop_threshold=0.0).num_tokens.tolist() == [1, 1]
    assert model.embed_video(fr, stop_threshold=0.0, min_embed_tokens=3).num_tokens.tolist() == [3, 3]
    assert model.embed_video(fr, stop_threshold=1.5).num_tokens.tolist() == [6, 6]
    assert model.embed_video(fr, stop_threshold=1.5, max_embed_tokens=2).num_tokens.tolist() == [2, 2]


@pytest.mark.parametrize("compact_every", [1, 3])
def test_sample_alone_equals_inside_batch(family, compact_every):
    model = build(family)
    model.cfg.compact_every = compact_every
    fr = frames(4, seed=3)
    probs = model.embed_video(fr, stop_threshold=1.5).stop_probs  # (4, K) every step's stop probability
    # choose a threshold under which the samples stop at different steps (first step whose probability exceeds it)
    def counts(thr):
        over = probs > thr
        return torch.where(over.any(1), over.float().argmax(1) + 1, torch.full((4,), probs.shape[1])).tolist()

    thr = max((t - 1e-6 for t in probs.flatten().tolist()), key=lambda t: len(set(counts(t))))
    assert len(set(counts(thr))) >= 2, "random model should give different stop steps"
    batch = model.embed_video(fr, stop_threshold=thr)
    assert batch.num_tokens.tolist() == counts(thr)
    for i in range(4):
        alone = model.embed_video(fr[i : i + 1], stop_threshold=thr)
        assert int(alone.num_tokens[0]) == int(batch.num_tokens[i])
        torch.testing.assert_close(alone.embeddings[0], batch.embeddings[i], rtol=1e-5, atol=1e-5)
    # and the adaptive embedding is the fixed-length embedding at the chosen length
    steps = model.video_embed_steps(fr, model.cfg.embed.max_embed_tokens).per_step
    picked = steps[torch.arange(4), batch.num_tokens - 1]
    torch.testing.assert_close(batch.embeddings, picked, rtol=1e-5, atol=1e-5)


def test_embeddings_unit_norm_and_text_composed():
    model = build("llama")
    fr = frames(2)
    e = model.embed_video(fr)
    assert e.embeddings.shape == (2, 24) and e.num_tokens.dtype == torch.long
    torch.testing.assert_close(e.embeddings.norm(dim=-1), torch.ones(2))
    t = model.embed_text(["a red circle moves left", "two squares"])
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    c = model.embed_composed(fr, ["make the circle blue", "remove the square"])
    assert c.embeddings.shape == (2, 24)
    p = model.match(fr, ["a", "b"])
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())



@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_moment_prompt_embeds_windows_after_their_own_prompt(family):
    """embed.moment_prompt: a window (moment=True) is embedded exactly as the same model with that prompt as its
    video prompt embeds it, in the adaptive decode and the training steps alike; unset, moment=True is the video
    path; the two prompts give different embeddings of the same frames."""
    model, fr = build(family), frames(3)
    with torch.no_grad():
        plain = model.embed_video(fr)
        unset = model.embed_video(fr, moment=True)
        assert unset.num_tokens.tolist() == plain.num_tokens.tolist()
        torch.testing.assert_close(unset.embeddings, plain.embeddings, rtol=1e-5, atol=1e-6)
        model.cfg.embed.moment_prompt = "Summarize the event in embeddings."
        window = model.embed_video(fr, moment=True)
        window_steps = model.video_embed_steps(fr, moment=True).per_step
        assert (window.embeddings - plain.embeddings).abs().max() > 1e-3
        twin = copy.deepcopy(model)
        twin.cfg.embed.video_prompt, twin.cfg.embed.moment_prompt = "Summarize the event in embeddings.", ""
        ref = twin.embed_video(fr)
        assert window.num_tokens.tolist() == ref.num_tokens.tolist()
        torch.testing.assert_close(window.embeddings, ref.embeddings, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(window_steps, twin.video_embed_steps(fr).per_step, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.embed_video(fr).embeddings, plain.embeddings, rtol=1e-5, atol=1e-6)

def _with_adapter(family: str, r: int = 4, isolate: bool = True, seed: int = 0) -> ViLLE:
    """A tiny model with a moment adapter whose up-projections are random (a fresh one changes nothing)."""
    torch.manual_seed(seed)
    model = ViLLE(replace(tiny_cfg(family), moment_adapter=MomentAdapterCfg(r=r, alpha=8.0, isolate=isolate))).eval()
    with torch.no_grad():
        for p in model.moment_adapter.up.values():
            p.normal_(0, 0.1)
    return model


def _folded(model: ViLLE) -> ViLLE:
    """The model without its adapter, the adapter's deltas added into the LLM's weights (in the model's dtype): the
    reference for a moment pass (its clip pass is then the moment pass of `model`)."""
    twin = ViLLE(replace(model.cfg, moment_adapter=MomentAdapterCfg())).eval().to(model.logit_scale.dtype)
    twin._llm_dtype = model._llm_dtype
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("moment_adapter.") for k in unexpected)
    a, layers = model.moment_adapter, dict(twin.llm.named_modules())
    with torch.no_grad():
        for key in a.down:
            layers[key.replace("__", ".")].weight += a.scale * a.up[key] @ a.down[key]
    return twin


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_moment_adapter_is_the_folded_weights_in_moment_passes_only(family):
    """model.moment_adapter: a window (embed_video / video_embed_steps with moment=True) and a moment query
    (embed_text(moment=True)) are embedded exactly as the model whose LLM weights include the adapter's
    scale * B A embeds them as clips and texts; every other pass (clips, texts, generation) is the model without the
    adapter; a fresh adapter (B = 0) changes nothing; a deep copy hooks its own adapter."""
    model, fr = _with_adapter(family), frames(3)
    folded = _folded(model)
    plain = ViLLE(replace(model.cfg, moment_adapter=MomentAdapterCfg())).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    texts = ["the red circle moves left", "a square"]
    with torch.no_grad():
        window = model.embed_video(fr, moment=True)
        ref = folded.embed_video(fr)
        assert window.num_tokens.tolist() == ref.num_tokens.tolist()
        torch.testing.assert_close(window.embeddings, ref.embeddings, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.video_embed_steps(fr, moment=True).per_step,
                                   folded.video_embed_steps(fr).per_step, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.embed_text(texts, moment=True), folded.embed_text(texts), rtol=1e-5,
                                   atol=1e-6)
        clip = model.embed_video(fr)
        assert (clip.embeddings - window.embeddings).abs().max() > 1e-3
        # (rounding only: the decode's chunk plan follows each model's earlier stops)
        torch.testing.assert_close(clip.embeddings, plain.embed_video(fr).embeddings, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.embed_text(texts), plain.embed_text(texts), rtol=0, atol=0)
        assert model.generate(fr, ["Describe"] * 3, max_new_tokens=4) == plain.generate(fr, ["Describe"] * 3,
                                                                                        max_new_tokens=4)
        twin = copy.deepcopy(model)
        for p in model.moment_adapter.up.values():
            p.zero_()
        torch.testing.assert_close(model.embed_video(fr, moment=True).embeddings, clip.embeddings, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(twin.embed_video(fr, moment=True).embeddings, window.embeddings, rtol=1e-5,
                                   atol=1e-6)


def test_isolated_moment_adapter_takes_every_gradient_of_a_moment_pass():
    """moment_adapter.isolate: a loss on moment passes (windows and queries) gives gradients to the adapter only,
    and they are the folded model's: dL/dB = scale * dL/dW' A^T and dL/dA = scale * B^T dL/dW' for each layer's
    folded weight W' (float64); without `isolate` the LLM's weights get gradients too."""
    model = _with_adapter("qwen2").double().train()
    model._llm_dtype = torch.float64  # the dtype the inputs are cast to, read at construction
    folded = _folded(model).train()
    fr, texts = frames(3), ["the red circle moves left", "a square", "stars"]

    def loss(m, moment):
        per_step = m.video_embed_steps(fr, moment=moment).per_step
        return (per_step * torch.linspace(-1, 1, per_step.shape[-1], dtype=per_step.dtype)).sum() + \
            (m.text_embed_train(texts, moment=moment) ** 3).sum()

    loss(model, True).backward()
    loss(folded, False).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded == {n for n, _ in model.moment_adapter.named_parameters(prefix="moment_adapter")}
    a, layers = model.moment_adapter, dict(folded.llm.named_modules())
    for key in a.down:
        g = layers[key.replace("__", ".")].weight.grad
        torch.testing.assert_close(a.up[key].grad, a.scale * g @ a.down[key].t(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.down[key].grad, a.scale * a.up[key].t() @ g, rtol=1e-9, atol=1e-12)
    shared = _with_adapter("qwen2", isolate=False).train()
    loss(shared, True).backward()
    assert shared.llm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert shared.head.out.weight.grad.abs().sum() > 0


def test_moment_adapter_saves_loads_and_names_bad_settings(tmp_path):
    model, fr = _with_adapter("llama"), frames(2)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = ViLLE.from_pretrained(str(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_video(fr, moment=True).embeddings,
                                   model.embed_video(fr, moment=True).embeddings, rtol=0, atol=0)
    with pytest.raises(ValueError, match="model.moment_adapter.target_modules"):
        ViLLE(replace(tiny_cfg(), moment_adapter=MomentAdapterCfg(r=2, target_modules=["qkv"])))
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="grad_checkpointing"):
        ViLLE(replace(cfg, llm=replace(cfg.llm, grad_checkpointing=True), moment_adapter=MomentAdapterCfg(r=2)))


def test_float_frames_and_any_size():
    model = build("llama")
    u8 = frames(1, t=3, h=37, w=91)
    fl = u8.permute(0, 1, 4, 2, 3).float() / 255.0
    a = model.embed_video(u8, num_tokens=2).embeddings
    b = model.embed_video(fl, num_tokens=2).embeddings
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kvformer_masked_mean_ignores_padding():
    model = build("llama")
    torch.manual_seed(0)
    states = torch.randn(3, 5, model.hidden)
    n = torch.tensor([2, 5, 1])
    ref = torch.stack([model.head(states[i : i + 1, : n[i]], n[i : i + 1])[0] for i in range(3)])
    garbage = states.clone()
    for i in range(3):
        garbage[i, n[i] :] = float("nan")
    out = model.head(garbage, n)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_save_load_round_trip_exact(tmp_path, family):
    model = build(family, lora=True)
    with torch.no_grad():  # make LoRA matter (its B matrices start at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = ViLLE.from_pretrained(str(tmp_path / "m")).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fr = frames(2)
    assert model.generate(fr, PROMPTS[:2], max_new_tokens=4) == loaded.generate(fr, PROMPTS[:2], max_new_tokens=4)
    torch.testing.assert_close(model.embed_video(fr).embeddings, loaded.embed_video(fr).embeddings, rtol=0, atol=0)


def test_from_pretrained_takes_a_run_folder_and_names_what_is_missing(tmp_path):
    model = build("llama")
    model.save_pretrained(str(tmp_path / "run" / "final"))  # where a training run leaves its model
    loaded = ViLLE.from_pretrained(str(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    saved = open(tmp_path / "run" / "final" / "config.yaml").read()
    assert "gemma" not in saved and "model_type: llama" in saved  # it names no checkpoint it was not built from
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ValueError, match=r"no config\.yaml.*unfinished/final"):
        ViLLE.from_pretrained(str(tmp_path / "unfinished"))


def test_pretrained_llm_needs_a_name():
    cfg = tiny_cfg("llama")
    cfg.llm.pretrained = True
    with pytest.raises(ValueError, match="model.llm.name"):
        ViLLE(cfg)


def test_partial_load_reports_keys(tmp_path):
    stage2 = build("llama", lora=False)
    stage2.save_pretrained(str(tmp_path / "s2"))
    cfg = tiny_cfg("llama", lora=True)
    cfg.head.dim = 16  # a new head size: its output projection cannot load
    torch.manual_seed(5)
    stage3 = ViLLE(cfg)
    report = stage3.load_weights(str(tmp_path / "s2"))
    assert report.missing and all("lora_" in k for k in report.missing), report
    assert any(k.startswith("head.out.weight") for k in report.mismatched), report
    assert not report.unexpected
    # the LLM base weights did load through peft's wrapping
    base = stage2.base_llm().model.layers[0].self_attn.q_proj.weight
    assert torch.equal(stage3.base_llm().model.layers[0].self_attn.q_proj.base_layer.weight, base)
    with pytest.raises(ValueError, match="do not match"):
        stage3.load_weights(str(tmp_path / "s2"), strict=True)


def test_lora_trains_only_adapters_and_heads():
    model = build("llama", lora=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm_trainable = [n for n in trainable if n.startswith("llm.")]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    for prefix in ("projector.", "head.", "match_head.", "emb_query", "logit_scale"):
        assert any(n.startswith(prefix) for n in trainable), prefix


def test_gradients_reach_every_stage():
    model = build("llama").train()
    fr = frames(2)
    steps = model.video_embed_steps(fr, 3)
    text = model.text_embed_train(["a", "b"])
    loss = (steps.per_step[:, -1] * text).sum() + steps.stop_logits.sum() + model.lm_loss(fr, ["q", "q"], ["a", "b"])
    loss = loss + model.match_logits(fr, ["a", "b"]).sum()
    loss.backward()
    for name in ("vision.trunk.patch_embed.proj.weight", "vision.temporal_pos", "projector.net.0.weight",
                 "head.pool", "emb_query", "match_query", "match_head.net.1.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_target_logprob_is_the_lm_loss_per_sample(family):
    """target_logprob (the generative matching score) is minus each sample's mean token loss: its batch mean is
    -lm_loss, each row equals the sample scored alone (targets of different lengths pad), and the video= path (one
    tower pass) gives the same scores."""
    model = build(family)
    fr = frames(3)
    prompts = ["Describe the video briefly."] * 3
    targets = ["a red circle", "two blue squares move left and then stop", "x"]
    with torch.no_grad():
        scores = model.target_logprob(fr, prompts, targets)
        torch.testing.assert_close(-scores.mean(), model.lm_loss(fr, prompts, targets), rtol=1e-5, atol=1e-6)
        alone = torch.cat([model.target_logprob(fr[i:i + 1], prompts[i:i + 1], targets[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)
        given = model.target_logprob(None, prompts, targets, video=model.video_tokens(fr))
        torch.testing.assert_close(given, scores, rtol=1e-5, atol=1e-6)
    assert bool((scores < 0).all())


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "4-d tensor"),
        (lambda: torch.zeros(1, 9, 32, 32, 3, dtype=torch.uint8), "T=9"),
        (lambda: torch.zeros(1, 2, 32, 32, 4, dtype=torch.uint8), "uint8 frames must be"),
        (lambda: torch.zeros(1, 2, 32, 32, 3, dtype=torch.int32), "dtype must be uint8"),
        (lambda: [1, 2], "torch.Tensor"),
    ],
    ids=["rank", "too-many-frames", "channels", "dtype", "not-tensor"],
)
def test_bad_frames(bad, match):
    model = build("llama")
    with pytest.raises(ValueError, match=match):
        model.embed_video(bad())


def test_bad_prompts_and_names():
    model = build("llama")
    with pytest.raises(ValueError, match="empty"):
        model.generate(frames(1), [])
    with pytest.raises(ValueError, match="batch size 2 but 1"):
        model.generate(frames(2), ["a"])
    with pytest.raises(ValueError, match="list of strings"):
        model.embed_text("a bare string")
    cfg = tiny_cfg()
    cfg.vision.name = "vit_does_not_exist"
    with pytest.raises(ValueError, match="unknown timm model"):
        ViLLE(cfg)
    cfg = tiny_cfg()
    cfg.llm.config["model_type"] = "not_a_model"
    with pytest.raises(ValueError, match="unknown LLM model_type"):
        ViLLE(cfg)


def test_attention_requires_state():
    model = build("llama")
    with pytest.raises(RuntimeError, match="ville_state"):
        model.base_llm().get_decoder()(inputs_embeds=torch.randn(1, 3, model.hidden))
    assert AttnState("full").mode == "full"


@pytest.mark.parametrize("compact_every", [1, 2, 10**6], ids=["compact", "compact-every-2", "pad-fill"])
def test_compacting_loop_equals_pad_fill(family, compact_every):
    """Forced stop steps 1..K: the compacting loop (finished samples removed) gives the same embeddings and counts
    as the loop that keeps every row until all stop (Hugging Face generate()'s behaviour)."""
    model = build(family)
    fr = frames(5, seed=7)
    schedule = torch.tensor([1, 6, 3, 2, 6])
    model.cfg.compact_every = 10**6
    padfill = model.embed_video(fr, _stop_schedule=schedule)
    model.cfg.compact_every = compact_every
    out = model.embed_video(fr, _stop_schedule=schedule)
    assert out.num_tokens.tolist() == schedule.tolist() == padfill.num_tokens.tolist()
    torch.testing.assert_close(out.embeddings, padfill.embeddings, rtol=1e-5, atol=1e-5)


def test_motion_channels_are_frame_differences():
    """vision.motion: tokens [x_t + pos_t, x_t - x_{t-1}], zero change for frame 0 and for a still video, and the
    change is exactly the difference of the per-frame features (the trunk sees frames one at a time)."""
    cfg = tiny_cfg("llama")
    cfg.vision.motion = True
    torch.manual_seed(0)
    model = ViLLE(cfg).eval()
    tower, C, N = model.vision, model.vision.width, model.vision.tokens_per_frame
    assert tower.out_width == 2 * C and model.projector.net[0].in_features == 2 * C
    fr = frames(2, t=4)
    with torch.no_grad():
        out = tower(fr).view(2, 4, N, 2 * C)
        alone = torch.stack([tower(fr[:, t:t + 1]).view(2, N, 2 * C)[..., :C] - tower.temporal_pos[0]
                             for t in range(4)], 1)  # per-frame features, each frame encoded on its own
        still = tower(fr[:, :1].expand(-1, 3, -1, -1, -1)).view(2, 3, N, 2 * C)
    torch.testing.assert_close(out[..., :C], alone + tower.temporal_pos[:4, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1:, :, C:], alone[:, 1:] - alone[:, :-1], rtol=1e-5, atol=1e-5)
    assert out[:, 0, :, C:].abs().max() == 0 and still[..., C:].abs().max() == 0
    assert out[:, 1:, :, C:].abs().amax((2, 3)).min() > 0  # random frames: every later frame changes
    emb = model.embed_video(fr, num_tokens=2).embeddings  # the whole model runs on the wider tokens
    assert emb.shape == (2, cfg.head.dim) and torch.isfinite(emb).all()


def test_stop_motion_reads_the_motion_energy():
    """embed.stop_motion: encode_video's energy is the mean over tokens of the RMS change channels (zero for a still
    video); the stop logit gains stop_motion * log(energy + 1e-4), the same in the teacher-forced and the decoding
    pass; a model without it loads with the weight at zero and embeds exactly as before; it needs vision.motion."""
    cfg = tiny_cfg("llama")
    cfg.vision.motion = True
    torch.manual_seed(0)
    plain_model = ViLLE(cfg).eval()
    cfg = copy.deepcopy(cfg)
    cfg.embed.stop_motion = True
    model = ViLLE(cfg).eval()
    report = model.load_state_dict(plain_model.state_dict(), strict=False)
    assert report.missing_keys == ["stop_motion"] and not report.unexpected_keys
    fr = frames(3, t=4)
    with torch.no_grad():
        before = model.embed_video(fr)
        ref = plain_model.embed_video(fr)
        assert before.num_tokens.tolist() == ref.num_tokens.tolist()
        torch.testing.assert_close(before.embeddings, ref.embeddings)
        model.stop_motion.fill_(-2.0)
        model.stop_step_bias.copy_(torch.randn_like(model.stop_step_bias))
        tokens, energy = model.encode_video(fr)
        x, C = model.vision(fr), model.vision.width
        assert energy.shape == (3, 1)
        torch.testing.assert_close(energy[:, 0].double(), x[..., C:].double().pow(2).mean(-1).sqrt().mean(1))
        assert energy.min() > 0 and model.encode_video(fr[:, :1].expand(-1, 4, -1, -1, -1))[1].abs().max() == 0
        steps = model.video_embed_steps(fr, 4)
        term = (-2.0 * torch.log(energy + 1e-4)).expand(-1, 4)
        torch.testing.assert_close(steps.stop_logits - model.stop_logit(steps.states), term)
        out = model.embed_video(fr, num_tokens=4)
        torch.testing.assert_close(out.stop_probs, torch.sigmoid(steps.stop_logits), rtol=1e-4, atol=1e-5)
    cfg = tiny_cfg("llama")
    cfg.embed.stop_motion = True
    with pytest.raises(ValueError, match="stop_motion.*vision.motion"):
        ViLLE(cfg)


@pytest.mark.parametrize("t,q", [(5, 2), (3, 4), (8, 8)])
def test_stop_motion_quantiles_read_per_frame_energies(t, q, tmp_path):
    """embed.stop_motion_quantiles q: the energy is q evenly spaced quantiles (linear interpolation, min .. max) of the
    per-frame mean change energies of frames 2..T (fp64 reference); the stop logit gains stop_motion . log(energy +
    1e-4), in the teacher-forced and the decoding pass alike; the weights get the halting gradient, the tower none
    through the energy; they survive save/load; a 1-frame clip gives zeros; bad settings are refused in one line."""
    cfg = tiny_cfg("llama")
    cfg.vision.motion, cfg.embed.stop_motion, cfg.embed.stop_motion_quantiles = True, True, q
    torch.manual_seed(0)
    model = ViLLE(cfg).eval()
    assert model.stop_motion.shape == (q,)
    fr = frames(3, t=t, seed=3)
    with torch.no_grad():
        model.stop_motion.copy_(torch.linspace(-1.5, 0.5, q))
        model.stop_step_bias.copy_(torch.randn_like(model.stop_step_bias))
        _, energy = model.encode_video(fr)
        x, C, N = model.vision(fr).double(), model.vision.width, model.vision.tokens_per_frame
    per_frame = x[..., C:].pow(2).mean(-1).sqrt().view(3, t, N).mean(2)[:, 1:]
    ranked = per_frame.sort(1).values
    pos = torch.linspace(0, 1, q, dtype=torch.float64) * (t - 2)  # fractional rank of each level among T-1 values
    lo, hi = pos.floor().long(), pos.ceil().long()
    want = ranked[:, lo] + (ranked[:, hi] - ranked[:, lo]) * (pos - lo)
    assert energy.shape == (3, q)
    torch.testing.assert_close(energy.double(), want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        steps = model.video_embed_steps(fr, 4)
        term = (model.stop_motion.double() * torch.log(want + 1e-4)).sum(-1, keepdim=True).expand(-1, 4)
        torch.testing.assert_close(steps.stop_logits.double() - model.stop_logit(steps.states).double(), term,
                                   rtol=1e-4, atol=1e-4)
        out = model.embed_video(fr, num_tokens=4)
        torch.testing.assert_close(out.stop_probs, torch.sigmoid(steps.stop_logits), rtol=1e-4, atol=1e-5)
        assert model.encode_video(fr[:, :1])[1].abs().max() == 0  # one frame: no change to measure
    model.train()
    steps = model.video_embed_steps(fr, 4)
    F.binary_cross_entropy_with_logits(steps.stop_logits, torch.ones_like(steps.stop_logits)).backward()
    assert model.stop_motion.grad.abs().min() > 0
    assert not model.encode_video(fr)[1].requires_grad  # no gradient into the tower through the energy
    model.eval().save_pretrained(str(tmp_path / "m"))
    loaded = ViLLE.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.cfg.embed.stop_motion_quantiles == q
    torch.testing.assert_close(loaded.stop_motion, model.stop_motion)
    with torch.no_grad():
        a, b = model.embed_video(fr), loaded.embed_video(fr)
    assert a.num_tokens.tolist() == b.num_tokens.tolist()
    torch.testing.assert_close(a.embeddings, b.embeddings)
    for bad, stop in ((1, True), (-2, True), (4, False)):
        cfg.embed.stop_motion_quantiles, cfg.embed.stop_motion = bad, stop
        with pytest.raises(ValueError, match="^model.embed.stop_motion_quantiles: expected 0"):
            ViLLE(cfg)


def test_shared_frame_features_equal_frames():
    """The tower is per-frame plus a per-clip assembly: assemble(frame_features(x)) is the tower, and embed_video from
    features computed one frame at a time (as the moment eval shares them across overlapping windows) equals
    embed_video from the frames, motion energy and stop decisions included (embed_composed likewise)."""
    cfg = tiny_cfg("llama")
    cfg.vision.motion, cfg.vision.pool, cfg.embed.stop_motion = True, 2, True
    torch.manual_seed(0)
    model = ViLLE(cfg).eval()
    tower = model.vision
    fr = frames(3, t=4)
    with torch.no_grad():
        model.stop_motion.fill_(-1.0)
        torch.testing.assert_close(tower.assemble(tower.frame_features(fr)), tower(fr))
        one_by_one = torch.cat([tower.frame_features(f[None, None]) for f in fr.reshape(12, *fr.shape[2:])])
        feats = one_by_one.reshape(3, 4, tower.tokens_per_frame, tower.width)
        a, b = model.embed_video(fr), model.embed_video(None, features=feats)
        edits = ["make the red circle blue", "make it large", "make the background gray"]
        c, d = model.embed_composed(fr, edits), model.embed_composed(None, edits, features=feats)
    assert a.num_tokens.tolist() == b.num_tokens.tolist() and c.num_tokens.tolist() == d.num_tokens.tolist()
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.embeddings, d.embeddings, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="T=9 frames"):
        tower.assemble(torch.zeros(1, 9, tower.tokens_per_frame, tower.width))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_modes_reduce_each_cell_of_the_patch_grid(mode):
    """vision.pool_mode: each output token is the mean / max over its pool x pool cell of the trunk's patch grid, the
    last row and column of cells clipped when pool does not divide the grid (a 4x4 grid, pool 3: cells 3 and 1)."""
    cfg = tiny_cfg("llama")
    cfg.vision.pool, cfg.vision.pool_mode = 3, mode
    torch.manual_seed(0)
    tower = ViLLE(cfg).eval().vision
    assert tuple(tower.grid) == (4, 4) and tower.tokens_per_frame == 4
    fr = frames(2, t=3)
    with torch.no_grad():
        got = tower.frame_features(fr)  # (2, 3, 4, C)
        grid = tower._trunk_tokens(tower.preprocess(fr)).view(2, 3, 4, 4, -1)
    reduce = (lambda x: x.mean((2, 3))) if mode == "avg" else (lambda x: x.amax((2, 3)))
    want = torch.stack([reduce(grid[:, :, r:r + 3, c:c + 3]) for r in (0, 3) for c in (0, 3)], 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_pool_mode_is_named():
    cfg = tiny_cfg("llama")
    cfg.vision.pool, cfg.vision.pool_mode = 2, "median"
    with pytest.raises(ValueError, match="model.vision.pool_mode.*'median'"):
        ViLLE(cfg)
