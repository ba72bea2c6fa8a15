"""The decoder LLM used as a prefix-LM, with ville's own attention function and KV cache.

Any `AutoModelForCausalLM` decoder works (tested: Gemma2, Llama, Qwen2). Rather than passing masks and cache objects
through transformers' model code (whose argument names moved between 5.x minors), ville registers one attention
function ("ville") through transformers' `AttentionInterface`. Every decoder family calls it with the rotary-embedded
`q, k, v` of one layer; the function reads an `AttnState` passed as a keyword argument and

- in `full` mode (training, prefill) applies the prefix-LM mask: bidirectional among each sample's prefix (video
  tokens + prompt), causal over its suffix, padding never visible; in prefill it also writes k/v into the cache;
- in `decode` mode writes the new token's k/v at each active sample's cache position and attends with
  `ville_kernels.decode_attention` over that sample's cache rows (`batch_idx`), so finished samples do no work.

Because transformers has no mask function for an unknown implementation name, it builds no mask at all for "ville"
(nothing of size L x L is created twice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

import ville_kernels

from . import attention
from .config import LLMCfg, LoRACfg  # noqa: F401  (this stage's config; torch-free home in config.py)

ATTN_NAME = "ville"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_llm(cfg: LLMCfg, vocab_size: int, saved_config_dir: str | None = None) -> nn.Module:
    """Build the causal LM (pretrained, from an inline config, or from a saved config folder) and resize its
    embeddings to the tokenizer's vocabulary."""
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"model.llm.dtype: expected one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    dtype = _DTYPES[cfg.dtype]
    if saved_config_dir is not None:
        config = AutoConfig.from_pretrained(saved_config_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif cfg.pretrained:
        if not cfg.name:
            raise ValueError("model.llm.name: a hub name or local path is required when model.llm.pretrained=true")
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype)
        except OSError as e:
            raise ValueError(
                f"model.llm.name: could not load {cfg.name!r} (hub name or local path expected; offline, set "
                f"model.llm.pretrained=false with model.llm.config for random weights): {e}"
            ) from e
    else:
        kw = dict(cfg.config)
        if "model_type" not in kw:
            raise ValueError("model.llm.config: needs 'model_type' (e.g. gemma2, llama, qwen2) when pretrained=false")
        try:
            config = AutoConfig.for_model(**kw)
        except ValueError as e:
            raise ValueError(f"model.llm.config: unknown LLM model_type {kw['model_type']!r} ({e})") from e
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=cfg.pretrained)
    register_attention()
    model.config._attn_implementation = ATTN_NAME
    model.config.ville_attention = attention.check_impl(cfg.attention)
    for sub in model.modules():  # some families copy the config onto sub-modules
        sub_cfg = getattr(sub, "config", None)
        if sub_cfg is not None and hasattr(sub_cfg, "_attn_implementation"):
            sub_cfg._attn_implementation = ATTN_NAME
            sub_cfg.ville_attention = model.config.ville_attention
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model: nn.Module, cfg: LoRACfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise ValueError(f"model.llm.lora.target_modules: {list(cfg.target_modules)} do not match the LLM ({e})") from e


# ----------------------------------------------------------------------------------------------------- attention
@dataclass
class AttnState:
    """What the attention function needs besides q/k/v, shared by all layers of one forward call.

    full mode: `prefix_lens`, `lens` (B,) per-sample prefix and total valid lengths of the right-padded sequence.
    decode mode: `rows` (n,) the cache rows of the n active samples, `pos` (n,) where this step's (first) token goes
    (= its cache length before the step), `step_lens` (B_cache,) cache lengths including this step's (first) token.
    A step may carry s consecutive tokens per sample (query length s): token j goes to pos + j and attends over
    step_lens + j positions.
    The cache, when present, is one (k, v) pair of `(B_cache, Hkv, L_max, Dh)` per layer, allocated by the first
    (prefill) call that writes into it: `cache_batch` rows (0: that call's batch). A prefill run in row slices
    (ville/model.py `_prefill`) writes its B rows at cache rows `row_offset` .. `row_offset` + B - 1.
    """

    mode: str
    prefix_lens: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    step_lens: torch.Tensor | None = None
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    cache_len: int = 0  # L_max of the cache
    cache_batch: int = 0  # B_cache
    row_offset: int = 0
    decode_impl: str = "auto"  # "auto" (ville_kernels dispatch) | "ref"
    _mask: torch.Tensor | None = None
    _block_masks: dict | None = None  # FlexAttention masks of this call, per (L, window) (ville/attention.py)

    def full_mask(self, L: int, device) -> torch.Tensor:
        """(B, 1, L, L) bool, True = may attend. Key j is visible to query i of sample b iff j is valid and either in
        b's prefix or not after i. A padded query sees itself only, so no row is empty (no NaN); no valid query
        ever sees a padded key."""
        if self._mask is None or self._mask.shape[-1] != L:
            i = torch.arange(L, device=device)
            valid = i[None, :] < self.lens.to(device)[:, None]  # (B, L) keys
            in_prefix = i[None, :] < self.prefix_lens.to(device)[:, None]
            causal = i[None, :] <= i[:, None]  # (Lq, Lk)
            mask = valid[:, None, :] & (in_prefix[:, None, :] | causal[None])
            mask = mask | torch.eye(L, dtype=torch.bool, device=device)[None]
            self._mask = mask[:, None]
        return self._mask


def _window_mask(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    if not window:
        return mask
    L = mask.shape[-1]
    i = torch.arange(L, device=mask.device)
    near = (i[:, None] - i[None, :]).abs() < window
    return mask & (near | torch.eye(L, dtype=torch.bool, device=mask.device))


def _full_attention(q, k, v, mask, scaling, softcap, dropout):
    B, Hq, L, Dh = q.shape
    Hkv = k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=Hq != Hkv
        )
    # SDPA has no logit soft-capping (Gemma2): explicit scores, softmax in fp32.
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def ville_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-interface function. query (B, Hq, L, Dh); key/value (B, Hkv, L, Dh), rotary applied.
    Returns (B, L, Hq, Dh) and no weights."""
    state: AttnState | None = kwargs.get("ville_state")
    if state is None:
        raise RuntimeError("ville attention called without ville_state: run the LLM through ville.ViLLE")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    layer = module.layer_idx
    if not module.training:
        dropout = 0.0
    if state.mode == "full":
        if state.cache is not None:  # prefill: keep this layer's keys/values
            B, Hkv, L, Dh = key.shape
            if layer not in state.cache:
                rows = state.cache_batch or B
                state.cache[layer] = (key.new_zeros(rows, Hkv, state.cache_len, Dh),
                                      value.new_zeros(rows, Hkv, state.cache_len, Dh))
            kc, vc = state.cache[layer]
            kc[state.row_offset:state.row_offset + B, :, :L] = key
            vc[state.row_offset:state.row_offset + B, :, :L] = value
        impl = attention.choose(getattr(module.config, "ville_attention", "auto"), query, softcap, dropout)
        if impl == "eager":
            mask = _window_mask(state.full_mask(query.shape[2], query.device), window)
            out = _full_attention(query, key, value, mask, scaling, softcap, dropout)
        else:
            out = attention.prefix_lm_attention(impl, query, key, value, state, scaling, softcap, window, dropout)
        return out.transpose(1, 2).contiguous(), None
    if state.mode != "decode":
        raise ValueError(f"AttnState.mode: expected 'full' or 'decode', got {state.mode!r}")
    kc, vc = state.cache[layer]
    s = query.shape[2]  # consecutive new tokens per active sample (their inputs known in advance: embedding steps)
    if s == 1:
        # Advanced indices separated by a slice put the index dim first: kc[rows, :, pos] is (n, Hkv, Dh).
        kc[state.rows, :, state.pos] = key[:, :, 0]
        vc[state.rows, :, state.pos] = value[:, :, 0]
    else:
        cols = state.pos[:, None] + torch.arange(s, device=state.pos.device)  # kc[rows, :, cols] is (n, s, Hkv, Dh)
        kc[state.rows[:, None], :, cols] = key.transpose(1, 2)
        vc[state.rows[:, None], :, cols] = value.transpose(1, 2)
    # Looked up on the module at call time (not bound at import) so benchmarks can wrap the op.
    fn = ville_kernels.decode_attention_ref if state.decode_impl == "ref" else ville_kernels.decode_attention
    extra = {"upcast": False} if state.decode_impl == "ref" else {}
    # Token j sees its sample's cache up to and including itself: cache lengths step_lens + j.
    out = torch.stack([fn(query[:, :, j], kc, vc, state.step_lens + j if j else state.step_lens,
                          batch_idx=state.rows, scale=scaling, softcap=softcap, window=window, **extra)
                       for j in range(s)], dim=1)
    return out.to(query.dtype), None


_registered = False


def register_attention() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, ville_attention)
        _registered = True
