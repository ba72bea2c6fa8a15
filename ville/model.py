"""ViLLE: where the stages meet. frames -> vision tower -> projector -> prefix-LM -> (text | KV-Former embedding).

Sequence layouts (each sample right-padded; positions are 0..len-1, so rotary positions never see padding):
- video prefix:    [video tokens, <bos>, prompt]                  (generation, embedding, matching)
- text prefix:     [<bos>, text, text_prompt]                     (text embedding: one readout step)
- composed prefix: [video tokens, <bos>, edit text, composed_prompt]
- suffixes:        target tokens + <eos> (LM loss) | K x emb_query (embedding steps) | match_query (matching)

The prefix is attended bidirectionally, the suffix causally (see ville/llm.py). The embedding-step and matching
inputs are learned vectors (`emb_query`, `match_query`) rather than rows of the LLM's embedding table, so they stay
trainable when LoRA freezes the LLM. The stop decision of embedding step t is the model choosing between emitting
the embedding-mode EOS `<eoe>` and another `<emb>`: stop_logit = logit[<eoe>] - logit[<emb>], i.e. the EOS
probability renormalised over the two tokens that are possible in embedding mode, plus a learned bias per step
(`stop_step_bias`, zero at init): the step states differ little from one another, and the bias lets the stop head
compare one per-video evidence against a threshold that moves with t. With `embed.stop_motion` that evidence includes
learned weights on the log of the clip's motion energies (`encode_video`): probes found the event count in the
tower's change magnitudes but not in the LLM's step state (README, design choices). `<eoe>` is its own token, not the
text `<eos>`: with a shared (and, in tied models, input-tied) row, the halting loss raised the text EOS and greedy
generation ended before its first word. Text generation never emits `<emb>`, `<eoe>` or `<match>`.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import MomentAdapter
from .checkpoint import load_model, load_weights, save_model
from .config import EmbedCfg, ModelCfg  # noqa: F401  (this stage's config; torch-free home in config.py)
from .head import KVFormerHead, MatchHead
from .llm import AttnState, apply_lora, build_llm
from .projector import Projector
from .tokenizer import EMB_TOKEN, EMBED_MODE_TOKENS, EOE_TOKEN, load_tokenizer
from .vision import VisionTower


@dataclass
class EmbedOutput:
    embeddings: torch.Tensor  # (B, D) L2-normalised
    num_tokens: torch.Tensor  # (B,) long, embedding tokens generated per sample
    stop_probs: torch.Tensor  # (B, K) stop probability at each decoded step (NaN after a sample stopped)


@dataclass
class EmbedSteps:
    """Training-time embedding pass: all K steps in one teacher-forced forward (every step's input is the same
    learned vector, so the K steps need no sampling)."""

    per_step: torch.Tensor  # (B, K, D): row t = normalised embedding pooled from steps 1..t+1
    stop_logits: torch.Tensor  # (B, K)
    states: torch.Tensor  # (B, K, H)


def _stop_threshold_logit(threshold: float) -> float:
    if threshold <= 0:
        return -math.inf
    if threshold >= 1:
        return math.inf
    return math.log(threshold / (1 - threshold))


def _prefill(model: "ViLLE", embeds: torch.Tensor, state: AttnState) -> torch.Tensor:
    """Prefill `state`'s KV cache with the prefix `embeds` (B, L, H) and return (B, H): each sample's last hidden state
    at its last valid position (lens - 1). The rows run in slices of at most `model.prefill_tokens_per_chunk` padded
    tokens (rows x L) per decoder forward, each writing its own cache rows: the decoder and the prefix-LM mask treat
    rows independently, so the slices give one whole-batch forward's cache and hidden states, while the activations
    and attention temporaries of a forward scale with the budget instead of the batch. L is the whole batch's padded
    length (no host sync on `lens`; sample lengths differ only by prompt tokens), so the last slice may be narrower,
    never shorter."""
    B, L = embeds.shape[:2]
    budget = model.cfg.prefill_tokens_per_chunk
    if budget < 0:
        raise ValueError(f"model.prefill_tokens_per_chunk: expected >= 0 (0 = the whole batch at once), got {budget}")
    if budget and L > budget:
        warnings.warn(f"model.prefill_tokens_per_chunk={budget} is below one sample's padded length {L}: the prefill "
                      f"runs one sample per forward", stacklevel=3)
    rows = B if budget == 0 else max(1, budget // L)
    last = []
    for s in range(0, B, rows):
        part = AttnState("full", prefix_lens=state.prefix_lens[s:s + rows], lens=state.lens[s:s + rows],
                         cache=state.cache, cache_len=state.cache_len, cache_batch=B, row_offset=s)
        h = model._decoder_forward(embeds[s:s + rows], part)
        last.append(h.gather(1, (part.lens - 1)[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0])
    return last[0] if len(last) == 1 else torch.cat(last)


class _DecodeSession:
    """Prefill once, then decode one token per active sample per step, dropping finished samples.

    CPU: finished samples are removed by physically compacting the caches (one gather per layer when the active set
    shrinks). CUDA: caches stay put and the attention kernel reads each active sample's rows through `batch_idx`.

    `chunk_tokens`: embedding steps all take the same input vector, so a forward may run s consecutive steps of each
    active sample at once; a sample that stops inside the chunk wastes the rest of it. A decode forward costs about
    a + b * tokens, and with few rows the fixed part a (every weight read once, Python per layer) dominates: hidden
    768, 6 layers, 1 thread of the 2-core VM, 24 ms at 1 row, 53 at 32, so a ~ 24 tokens' worth of b. `chunk_tokens`
    is that ratio a / b, and `plan_chunk` picks s by planning the rest of the decode with it and the stop rate seen
    so far (docs/design.md, "Several embedding steps per forward"). Steps before min_embed_tokens cannot stop and
    always share a forward. Text generation decodes one token at a time."""

    chunk_tokens = 24

    def __init__(self, model: "ViLLE", embeds, prefix_lens, lens, max_new: int):
        self.model = model
        B = embeds.shape[0]
        self.state = AttnState("full", prefix_lens=prefix_lens, lens=lens, cache={},
                               cache_len=embeds.shape[1] + max_new, decode_impl=model.cfg.decode_attention)
        self.last_hidden = _prefill(model, embeds, self.state)  # (B, H) at each sample's last prefix position
        self.physical = not embeds.is_cuda
        self.cache_lens = lens.clone()  # (B_cache,) next write position per cache row
        self.active = torch.arange(B, device=embeds.device)  # original sample index of each active row
        self.cache_rows = self.active.clone()  # cache row of each active sample

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, H) input embeddings of the n active samples -> (n, H) last hidden states; or x (n, s, H), s
        consecutive tokens per sample in one forward -> (n, s, H)."""
        tokens = x if x.dim() == 3 else x[:, None]
        rows = self.cache_rows
        pos = self.cache_lens[rows]
        st = AttnState("decode", rows=rows, pos=pos, step_lens=self.cache_lens + 1,
                       cache=self.state.cache, cache_len=self.state.cache_len, decode_impl=self.state.decode_impl)
        offsets = torch.arange(tokens.shape[1], device=pos.device)
        h = self.model._decoder_forward(tokens, st, position_ids=pos[:, None] + offsets)
        self.cache_lens[rows] += tokens.shape[1]
        return h if x.dim() == 3 else h[:, 0]

    def plan_chunk(self, remaining: int, row_steps: int, stops: int, survival: list[float] | None = None) -> int:
        """Steps s (1..remaining) for the next forward of the n active rows: the first move of the cheapest plan for
        the remaining steps under the cost model a + b * tokens (a / b = chunk_tokens), where a forward runs only
        while some row is live. `survival[u]`: the fraction of the active rows still live u steps ahead (from the
        stop steps of the model's earlier calls, `ViLLE._stop_survival`); without it each row stops after a step
        with the rate h seen so far in this call (stops / row_steps, over steps where stopping was possible), a
        fraction (1 - h)^u. Whatever the chunking, about n f_u rows are live u steps ahead and some row with
        probability 1 - (1 - f_u)^n, so the plan is a shortest path over steps, O(remaining^2). With neither, ceil(
        chunk_tokens / n) (one forward's fixed cost spread over the rows). chunk_tokens 1 means one step per
        forward, as Hugging Face generate() decodes."""
        n = self.active.numel()
        if self.chunk_tokens <= 1:
            return 1
        if survival is None:
            if row_steps == 0:
                return max(1, min(remaining, -(-self.chunk_tokens // n)))
            live = 1.0 - min(max(stops / row_steps, 1e-3), 1.0)
            survival = [live ** u for u in range(remaining)]
        cost = [0.0] * (remaining + 1)  # cost[u]: cheapest way to decode steps u..remaining-1, in units of b
        first = [1] * (remaining + 1)
        for u in range(remaining - 1, -1, -1):
            f = min(max(survival[u], 0.0), 1.0)
            forward = self.chunk_tokens * (1.0 - (1.0 - f) ** n)  # the fixed part, paid only if a row is live
            cost[u], first[u] = min((forward + n * f * s + cost[u + s], s) for s in range(1, remaining - u + 1))
        return first[0]

    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the active samples where `keep` (n,) is True."""
        self.active = self.active[keep]
        rows = self.cache_rows[keep]
        if self.physical:
            for layer, (k, v) in self.state.cache.items():
                self.state.cache[layer] = (k[rows], v[rows])
            self.cache_lens = self.cache_lens[rows]
            rows = torch.arange(rows.numel(), device=rows.device)
        self.cache_rows = rows


def _scalars_to_vectors(module, state_dict, prefix, *args) -> None:
    """Load-time compatibility: `logit_scale` / `stop_motion` were 0-d before they became (1,) for FSDP2."""
    for name in ("logit_scale", "stop_motion"):
        value = state_dict.get(prefix + name)
        if torch.is_tensor(value) and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)


class ViLLE(nn.Module):
    def __init__(self, cfg: ModelCfg, tokenizer=None, _saved_llm_config: str | None = None):
        super().__init__()
        vlm = None
        if cfg.init_from_vlm and _saved_llm_config is None:  # a saved ville model brings its own architecture
            from .vlm import VLMCheckpoint

            vlm = VLMCheckpoint(cfg.init_from_vlm)
            cfg = vlm.resolve(cfg)
        self.cfg = cfg
        if cfg.moment_adapter.r and cfg.llm.grad_checkpointing:
            raise ValueError("model.moment_adapter: cannot be combined with model.llm.grad_checkpointing (the "
                             "recomputed forward would run without the adapter)")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.llm.tokenizer)
        self.vision = VisionTower(cfg.vision)
        llm = build_llm(cfg.llm, len(self.tokenizer), _saved_llm_config)
        self.hidden = int(llm.config.hidden_size)
        self.projector = Projector(cfg.projector, self.vision.out_width, self.hidden)
        self.head = KVFormerHead(cfg.head, self.hidden)
        self.match_head = MatchHead(self.hidden)
        init = llm.get_input_embeddings().weight.detach()
        self.emb_query = nn.Parameter(init[self.tokenizer.convert_tokens_to_ids(EMB_TOKEN)].clone().float())
        self.match_query = nn.Parameter(init.float().mean(0) + 0.02 * torch.randn(self.hidden))
        # One-element vectors, not scalars: FSDP2 shards every parameter along dim 0 and refuses 0-d ones. Files
        # written while they were scalars still load (`_scalars_to_vectors`).
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.embed.init_temperature)))
        self._stop_history: dict[tuple[int, int], list[float]] = {}  # _record_stops
        self.stop_step_bias = nn.Parameter(torch.zeros(cfg.embed.max_embed_tokens))
        if cfg.embed.stop_motion and not cfg.vision.motion:
            raise ValueError("model.embed.stop_motion: needs model.vision.motion: true (it reads the change channels)")
        q = cfg.embed.stop_motion_quantiles
        if q == 1 or q < 0 or (q and not cfg.embed.stop_motion):
            raise ValueError(f"model.embed.stop_motion_quantiles: expected 0 (the clip's mean energy) or >= 2 with "
                             f"model.embed.stop_motion: true, got {q} (stop_motion {cfg.embed.stop_motion})")
        self.stop_motion = nn.Parameter(torch.zeros(max(q, 1))) if cfg.embed.stop_motion else None
        self.register_load_state_dict_pre_hook(_scalars_to_vectors)
        # the LLM's own layers, found before peft wraps them (ville/adapter.py)
        self.moment_adapter = MomentAdapter(llm, cfg.moment_adapter) if cfg.moment_adapter.r else None
        self.llm = apply_lora(llm, cfg.llm.lora) if cfg.llm.lora.enabled else llm
        ids = self.tokenizer
        self.bos_id = ids.bos_token_id if ids.bos_token_id is not None else ids.eos_token_id
        self.eos_id = ids.eos_token_id
        self.pad_id = ids.pad_token_id
        self.emb_id = ids.convert_tokens_to_ids(EMB_TOKEN)
        self.eoe_id = ids.convert_tokens_to_ids(EOE_TOKEN)
        self.embed_mode_ids = [ids.convert_tokens_to_ids(t) for t in EMBED_MODE_TOKENS]
        self._llm_dtype = llm.get_input_embeddings().weight.dtype
        if vlm is not None:
            vlm.load_into(self)

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_recipe(cls, path: str, overrides: list[str] | None = None) -> "ViLLE":
        from .config import load_section

        return cls(load_section(path, "model", ModelCfg, overrides))

    @classmethod
    def from_vlm(cls, source: str, cfg: ModelCfg | None = None) -> "ViLLE":
        """Start from a PaliGemma 1/2 checkpoint (hub id or local folder; ville/vlm.py): its tower, projector, LLM
        and tokenizer. `cfg` supplies everything else (frames, pooling, heads, LoRA; default: ModelCfg's) and may
        name a recipe's fallback tokenizer for checkpoints without one."""
        from .config import ProjectorCfg

        cfg = ModelCfg(projector=ProjectorCfg(kind="linear")) if cfg is None else cfg
        return cls(replace(cfg, init_from_vlm=source))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def base_llm(self) -> nn.Module:
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    # ------------------------------------------------------------------------------------------ building blocks
    def _video_prompt_ids(self, batch: int, moment: bool = False) -> list[list[int]]:
        """The fixed video prompt (`moment`: embed.moment_prompt, when set) for `batch` samples, tokenized once (the
        rows share one list; it is only read)."""
        e = self.cfg.embed
        if moment and e.moment_prompt:
            return self._token_ids([e.moment_prompt], "moment_prompt") * batch
        return self._token_ids([e.video_prompt], "video_prompt") * batch

    @contextlib.contextmanager
    def _moment_scope(self, moment: bool):
        """Inside: the moment adapter is on when `moment` (and the model has one); with `isolate` and gradients
        enabled, `_decoder_forward` and `_head` also cut the moment pass off every other weight."""
        adapter = self.moment_adapter
        if not moment or adapter is None:
            yield
            return
        adapter.activate()
        adapter.isolating = adapter.cfg.isolate and torch.is_grad_enabled()
        try:
            yield
        finally:
            adapter.deactivate()
            adapter.isolating = False

    @property
    def _isolating(self) -> bool:
        return self.moment_adapter is not None and self.moment_adapter.isolating

    def _head(self, states: torch.Tensor, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The KV-Former head: `head(states, num_tokens)`, or `head.per_step(states)` when num_tokens is None; on
        detached parameters inside an isolating moment pass."""
        if not self._isolating:
            return self.head.per_step(states) if num_tokens is None else self.head(states, num_tokens)
        params = {n: p.detach() for n, p in self.head.named_parameters()}
        return torch.func.functional_call(self.head, params, (states, num_tokens))

    def _token_ids(self, texts, what: str) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"{what}: expected a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError(f"{what}: empty list")
        out = []
        for t in texts:
            if isinstance(t, str):
                out.append(self.tokenizer(t, add_special_tokens=False).input_ids[: self.cfg.max_text_tokens])
            elif isinstance(t, (list, tuple)):
                out.append(list(t)[: self.cfg.max_text_tokens])
            else:
                raise ValueError(f"{what}: items must be str or token-id lists, got {type(t).__name__}")
        return out

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device)).to(self._llm_dtype)

    def video_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) frames -> (B, T*N, H) LLM-width video tokens."""
        return self.encode_video(frames)[0]

    def encode_video(self, frames: torch.Tensor, features: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, ...) frames -> (video tokens (B, T*N, H), motion energy (B, k) or None without `embed.stop_motion`).
        A token's change energy is the RMS over channels of its change since the previous frame (the tower's motion
        channels). k = 1 (`embed.stop_motion_quantiles` 0): the mean over a clip's tokens. k >= 2: k evenly spaced
        quantiles (min .. max) of the per-frame means over frames 2..T (frame 1 has no previous frame; a 1-frame clip
        gives zeros). Without gradient: the stop head reads it, halting does not train the tower through it.
        `features`: the frames' `vision.frame_features`, computed once for clips sharing frames (then `frames` may be
        None)."""
        if features is None:
            self.vision.validate(frames)
            x = self.vision(frames.to(self.device))
        else:
            x = self.vision.assemble(features.to(self.device))
        energy = None
        if self.stop_motion is not None:
            C, q = self.vision.width, self.cfg.embed.stop_motion_quantiles
            per_token = x[..., C:].detach().float().norm(dim=-1) / C ** 0.5  # (B, T*N)
            if not q:
                energy = per_token.mean(1, keepdim=True)
            else:
                per_frame = per_token.reshape(x.shape[0], -1, self.vision.tokens_per_frame).mean(2)[:, 1:]
                levels = torch.linspace(0, 1, q, device=x.device)
                energy = (torch.quantile(per_frame, levels, dim=1).T if per_frame.shape[1]
                          else per_frame.new_zeros(x.shape[0], q))
        return self.projector(x).to(self._llm_dtype), energy

    def _pack(self, prefixes: list[list[torch.Tensor]], suffixes: list[torch.Tensor] | None = None):
        """Concatenate each sample's prefix parts (+ suffix), right-pad. -> embeds (B, L, H), prefix_lens, lens."""
        seqs, plens = [], []
        for i, parts in enumerate(prefixes):
            pre = torch.cat(parts, 0)
            plens.append(pre.shape[0])
            seqs.append(pre if suffixes is None else torch.cat([pre, suffixes[i].to(pre.dtype)], 0))
        lens = torch.tensor([s.shape[0] for s in seqs], device=self.device)
        embeds = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        return embeds, torch.tensor(plens, device=self.device), lens

    def _video_prefixes(self, frames, prompt_ids: list[list[int]], video=None) -> list[list[torch.Tensor]]:
        video = self.video_tokens(frames) if video is None else video
        if video.shape[0] != len(prompt_ids):
            raise ValueError(f"frames has batch size {video.shape[0]} but {len(prompt_ids)} prompts/texts were given")
        return [[video[i], self._embed_ids([self.bos_id] + p)] for i, p in enumerate(prompt_ids)]

    def _decoder_forward(self, embeds, state: AttnState, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
        decoder = self.base_llm().get_decoder()
        kwargs = {"inputs_embeds": embeds, "position_ids": position_ids, "ville_state": state}
        if not self._isolating:
            return decoder(**kwargs).last_hidden_state
        # A moment pass under moment_adapter.isolate: gradients reach the adapter's hooks only.
        kwargs["inputs_embeds"] = embeds.detach()
        params = {n: p.detach() for n, p in decoder.named_parameters()}
        return torch.func.functional_call(decoder, params, (), kwargs).last_hidden_state

    def _final_softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.base_llm().config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._final_softcap(self.base_llm().get_output_embeddings()(h)).float()

    def stop_logit(self, h: torch.Tensor, energy: torch.Tensor | None = None, first_step: int = 0) -> torch.Tensor:
        """Stop logits of embedding steps: h (B, k, H) of steps first_step + 1 .. first_step + k; energy (B, q) from
        `encode_video` -> (B, k) logit[<eoe>] - logit[<emb>] + stop_step_bias[step] + stop_motion . log(energy + 1e-4)
        (only those two rows of the LM head are computed; steps past the configured maximum share the last bias; the
        motion term only with `embed.stop_motion` and a video; 1e-4 is well below a moving clip's energy, ~0.02)."""
        head = self.base_llm().get_output_embeddings()
        rows = torch.tensor([self.eoe_id, self.emb_id], device=h.device)
        w = head.weight[rows]
        logits = F.linear(h.to(w.dtype), w, None if head.bias is None else head.bias[rows])
        logits = self._final_softcap(logits).float()
        steps = first_step + torch.arange(h.shape[-2], device=h.device)
        out = logits[..., 0] - logits[..., 1] + self.stop_step_bias[steps.clamp_max(self.stop_step_bias.shape[0] - 1)]
        if energy is not None and self.stop_motion is not None:
            out = out + (self.stop_motion * torch.log(energy.float() + 1e-4)).sum(-1, keepdim=True)
        return out

    def _full(self, prefixes, suffixes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, plens, lens = self._pack(prefixes, suffixes)
        h = self._decoder_forward(embeds, AttnState("full", prefix_lens=plens, lens=lens))
        return h, plens, lens

    def _suffix_states(self, prefixes, query: torch.Tensor, k: int) -> torch.Tensor:
        """Teacher-forced pass with k copies of `query` as suffix -> (B, k, H) suffix hidden states."""
        suffix = query.to(self._llm_dtype)[None].expand(k, -1)
        h, plens, _ = self._full(prefixes, [suffix] * len(prefixes))
        idx = plens[:, None] + torch.arange(k, device=h.device)[None]
        return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))

    # --------------------------------------------------------------------------------------- training passes
    def video_embed_steps(self, frames, k: int | None = None, prompts: list[str] | None = None,
                          video: tuple | None = None, moment: bool = False) -> EmbedSteps:
        """All k embedding steps in one forward (with gradients). prompts=None uses embed.video_prompt (`moment`:
        embed.moment_prompt, for localisation windows); `video` passes precomputed `encode_video(frames)` (shared
        with the LM pass of the same batch)."""
        k = k or self.cfg.embed.max_embed_tokens
        B = self.vision.validate(frames)
        prompt_ids = self._video_prompt_ids(B, moment) if prompts is None else self._token_ids(prompts, "prompts")
        tokens, energy = self.encode_video(frames) if video is None else video
        with self._moment_scope(moment):
            states = self._suffix_states(self._video_prefixes(frames, prompt_ids, tokens), self.emb_query, k)
            return EmbedSteps(self._head(states), self.stop_logit(states, energy=energy), states)

    def composed_embed_steps(self, frames, edits, k: int | None = None) -> EmbedSteps:
        edit_ids = self._token_ids(edits, "edits")
        prompt = self._token_ids([self.cfg.embed.composed_prompt], "composed_prompt")[0]
        return self.video_embed_steps(frames, k, prompts=[e + prompt for e in edit_ids])

    def lm_loss(self, frames, prompts, targets, video: tuple | None = None) -> torch.Tensor:
        """Next-token loss on the targets (+ <eos>) given video + prompt; `video`: precomputed encode_video(frames).
        The mean over samples of each sample's mean token loss: every target counts once whatever its length, and the
        mean over ranks of this loss is the loss of the global batch (a token mean would not be)."""
        tok, mask = self._target_token_nll(frames, prompts, targets, None if video is None else video[0])
        return (tok.sum(1) / mask.sum(1)).mean()

    def target_logprob(self, frames, prompts, targets, video: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) mean log-probability per token of each target (+ <eos>) given video i + prompt i: the generative
        matching score (`ville.eval` re-ranking with `rerank_score: lm`). `video`: as in `match_logits`."""
        tok, mask = self._target_token_nll(frames, prompts, targets, video)
        return -(tok.sum(1) / mask.sum(1))

    def _target_token_nll(self, frames, prompts, targets, video_tokens=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, L) per-token negative log-likelihoods of the targets + <eos> (0 past each target) and their mask."""
        prompt_ids = self._token_ids(prompts, "prompts")
        target_ids = [t + [self.eos_id] for t in self._token_ids(targets, "targets")]
        if len(target_ids) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
        prefixes = self._video_prefixes(frames, prompt_ids, video_tokens)
        h, plens, lens = self._full(prefixes, [self._embed_ids(t) for t in target_ids])
        # Position plens-1+j predicts target token j.
        tlen = max(len(t) for t in target_ids)
        pos = (plens[:, None] - 1 + torch.arange(tlen, device=h.device)[None]).clamp_max(h.shape[1] - 1)
        logits = self.lm_logits(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
        labels = torch.full((len(target_ids), tlen), -100, dtype=torch.long, device=h.device)
        for i, t in enumerate(target_ids):
            labels[i, : len(t)] = torch.tensor(t, device=h.device)
        tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return tok, labels != -100

    def text_embed_train(self, texts, moment: bool = False) -> torch.Tensor:
        """(B, D) text embeddings, with gradients. `moment`: the texts are moment queries, embedded after
        embed.moment_text_prompt (when set)."""
        ids = self._token_ids(texts, "texts")
        e = self.cfg.embed
        which = "moment_text_prompt" if moment and e.moment_text_prompt else "text_prompt"
        prompt = self._token_ids([getattr(e, which)], which)[0]
        prefixes = [[self._embed_ids([self.bos_id] + t + prompt)] for t in ids]
        with self._moment_scope(moment):
            states = self._suffix_states(prefixes, self.emb_query, 1)
            return self._head(states, torch.ones(len(ids), dtype=torch.long, device=self.device))

    def match_logits(self, frames, texts, video: torch.Tensor | None = None) -> torch.Tensor:
        """`video`: precomputed `video_tokens(frames)` (B, T*N, H) (one tower pass for a clip scored against many
        texts); then `frames` is not read and may be None."""
        ids = self._token_ids(texts, "texts")
        prompt = self._token_ids([self.cfg.embed.match_prompt], "match_prompt")[0]
        states = self._suffix_states(self._video_prefixes(frames, [t + prompt for t in ids], video), self.match_query,
                                     1)
        return self.match_head(states[:, 0])

    def forward(self, batches: dict, loss_cfg) -> tuple[torch.Tensor, dict]:
        """Training step: the weighted multi-task loss of one batch per task (one forward, so DDP sees one)."""
        from .losses import multitask_loss

        return multitask_loss(self, batches, loss_cfg)

    # -------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def _adaptive_embed(self, prefixes, stop_threshold, max_embed_tokens, min_embed_tokens,
                        stop_schedule: torch.Tensor | None = None, energy: torch.Tensor | None = None) -> EmbedOutput:
        """`stop_schedule` (B,) forces each sample's stop step (benchmarks and tests of the loop's cost); `energy`
        (B, q) is the prefix video's motion energy (`encode_video`), read by the stop logit."""
        e = self.cfg.embed
        K = max_embed_tokens if max_embed_tokens is not None else e.max_embed_tokens
        kmin = min_embed_tokens if min_embed_tokens is not None else e.min_embed_tokens
        thr = _stop_threshold_logit(stop_threshold if stop_threshold is not None else e.stop_threshold)
        if not 1 <= kmin <= K:
            raise ValueError(f"need 1 <= min_embed_tokens <= max_embed_tokens, got {kmin} and {K}")
        embeds, plens, lens = self._pack(prefixes)
        B = embeds.shape[0]
        sess = _DecodeSession(self, embeds, plens, lens, K)
        states = embeds.new_zeros(B, K, self.hidden)
        stop_probs = torch.full((B, K), float("nan"), device=self.device)
        num = torch.full((B,), K, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        query = self.emb_query.to(self._llm_dtype)
        every = max(1, self.cfg.compact_every)
        schedule = None if stop_schedule is None else stop_schedule.to(self.device)
        t = 0
        row_steps = stops = 0  # live row-steps where a stop was possible, and the stops seen (plan_chunk)
        history = self._stop_history.setdefault((K, kmin), [0.0] * (K + 1))
        while t < K:
            act = sess.active
            survival = self._stop_survival(history, t, K - t)
            chunk = sess.plan_chunk(K - t, row_steps, stops, survival)
            if stop_schedule is None:
                chunk = max(chunk, kmin - t)  # steps that cannot stop share a forward
            h = sess.step(query.expand(act.numel(), chunk, -1))
            steps = t + torch.arange(chunk, device=h.device)
            s = self.stop_logit(h, energy=None if energy is None else energy[act], first_step=t)
            if schedule is not None:
                can_stop = schedule[act][:, None] <= steps[None] + 1
            else:
                can_stop = (s > thr) & (steps[None] + 1 >= kmin)
            # A row records steps up to and including its first stop in the chunk; rows kept alive only until the
            # next compaction (already done) record nothing.
            was_live = ~done[act]
            stopped = can_stop.any(dim=1) & was_live
            first = torch.where(can_stop.any(dim=1), can_stop.int().argmax(dim=1), chunk)
            record = was_live[:, None] & (steps[None] - t <= first[:, None])
            states[act, t:t + chunk] = torch.where(record[..., None], h.to(states.dtype), states[act, t:t + chunk])
            stop_probs[act, t:t + chunk] = torch.where(record, torch.sigmoid(s), stop_probs[act, t:t + chunk])
            num[act] = torch.where(stopped, t + first + 1, num[act])
            done[act] = done[act] | stopped
            possible = (steps + 1 >= kmin) if schedule is None else torch.ones_like(steps, dtype=torch.bool)
            seen = torch.stack([(record & possible[None]).sum(), stopped.sum()]).tolist()  # one host sync
            row_steps, stops = row_steps + seen[0], stops + seen[1]
            t += chunk
            if t == K:
                break
            if t // every > (t - chunk) // every:
                keep = ~done[act]
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        break
                    sess.keep(keep)
        if schedule is None and kmin < K:  # forced schedules (benchmarks, tests) read the history, never write it
            self._record_stops(history, num)
        return EmbedOutput(self.head(states, num), num, stop_probs)

    # The stop steps of earlier adaptive calls, per (max, min) tokens: history[k] ~ how many rows stopped after k
    # tokens, halved whenever it passes STOP_HISTORY rows, so it follows the recent calls. It only plans how many steps
    # share a decoder forward (`_DecodeSession.plan_chunk`); no result depends on it beyond float rounding.
    STOP_HISTORY = 1024

    def _record_stops(self, history: list[float], num: torch.Tensor) -> None:
        for k in num.tolist():
            history[k] += 1.0
        if sum(history) > self.STOP_HISTORY:
            history[:] = [h / 2 for h in history]

    @staticmethod
    def _stop_survival(history: list[float], t: int, remaining: int) -> list[float] | None:
        """history -> the fraction of the rows live at step t (more than t tokens) still live u steps later, u = 0 ..
        remaining - 1; None before any earlier row got that far."""
        live = sum(history[t + 1:])
        if live <= 0:
            return None
        return [sum(history[t + u + 1:]) / live for u in range(remaining)]

    def embed_video(self, frames, stop_threshold=None, max_embed_tokens=None, min_embed_tokens=None,
                    num_tokens: int | None = None, _stop_schedule: torch.Tensor | None = None,
                    features: torch.Tensor | None = None, moment: bool = False) -> EmbedOutput:
        """Adaptive-length video embedding. `num_tokens=k` is the fixed-length mode (exactly k tokens). `features`
        (B, T, N, C): precomputed `vision.frame_features` in place of `frames` (pass frames=None). `moment`: the
        frames are a candidate window of a longer video, embedded after embed.moment_prompt (when set) for moment
        retrieval, as localisation trains them."""
        if num_tokens is not None:
            stop_threshold, max_embed_tokens, min_embed_tokens = 2.0, num_tokens, num_tokens
        B = self.vision.validate(frames) if features is None else features.shape[0]
        prompt_ids = self._video_prompt_ids(B, moment)
        tokens, energy = self.encode_video(frames, features)
        with self._moment_scope(moment):
            return self._adaptive_embed(self._video_prefixes(frames, prompt_ids, tokens), stop_threshold,
                                        max_embed_tokens, min_embed_tokens, _stop_schedule, energy)

    def embed_composed(self, frames, edits, stop_threshold=None, max_embed_tokens=None, min_embed_tokens=None,
                       num_tokens: int | None = None, features: torch.Tensor | None = None) -> EmbedOutput:
        """Composed query: video + edit text as the prefix, then the normal adaptive decode. `features`: as in
        `embed_video` (one tower pass shared with the source video's own embedding)."""
        if num_tokens is not None:
            stop_threshold, max_embed_tokens, min_embed_tokens = 2.0, num_tokens, num_tokens
        edit_ids = self._token_ids(edits, "edits")
        prompt = self._token_ids([self.cfg.embed.composed_prompt], "composed_prompt")[0]
        tokens, energy = self.encode_video(frames, features)
        prefixes = self._video_prefixes(frames, [e + prompt for e in edit_ids], tokens)
        return self._adaptive_embed(prefixes, stop_threshold, max_embed_tokens, min_embed_tokens, energy=energy)

    @torch.no_grad()
    def embed_text(self, texts, moment: bool = False) -> torch.Tensor:
        """One-step readout: (B, D) L2-normalised. `moment`: moment queries (embed.moment_text_prompt, when set)."""
        return self.text_embed_train(texts, moment)

    @torch.no_grad()
    def match(self, frames, texts, video: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) probability that video i matches text i (`video`: as in `match_logits`)."""
        return torch.sigmoid(self.match_logits(frames, texts, video).float())

    @torch.no_grad()
    def generate(self, frames, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 min_new_tokens: int = 0, video: torch.Tensor | None = None) -> list[str]:
        """KV-cached decoding, greedy by default; each sample stops at its own <eos> and then does no work.
        `min_new_tokens`: <eos> cannot be chosen before that many tokens (as in transformers' generate). `video`:
        precomputed `video_tokens(frames)` (one tower pass for a clip asked many questions); `frames` is then unread."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens, got {min_new_tokens} and {max_new_tokens}")
        prompt_ids = self._token_ids(prompts, "prompts")
        embeds, plens, lens = self._pack(self._video_prefixes(frames, prompt_ids, video))
        B = embeds.shape[0]
        sess = _DecodeSession(self, embeds, plens, lens, max_new_tokens)
        h = sess.last_hidden
        out: list[list[int]] = [[] for _ in range(B)]
        # Added to the logits once per step: text mode has only text tokens and <eos> (not before min_new_tokens).
        banned = h.new_zeros(self.base_llm().get_output_embeddings().weight.shape[0], dtype=torch.float32)
        banned[self.embed_mode_ids] = float("-inf")
        no_eos = banned.index_fill(0, torch.tensor([self.eos_id], device=h.device), float("-inf"))
        for step in range(max_new_tokens):
            logits = self.lm_logits(h) + (no_eos if step < min_new_tokens else banned)
            if do_sample:
                logits = logits / max(temperature, 1e-5)
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            act = sess.active.tolist()
            for i, tok in zip(act, nxt.tolist()):
                out[i].append(tok)
            keep = nxt != self.eos_id
            if step + 1 == max_new_tokens or not bool(keep.any()):
                break
            if not bool(keep.all()):
                sess.keep(keep)
                nxt = nxt[keep]
            h = sess.step(self._embed_ids(nxt.tolist()))
        return [self.tokenizer.decode([t for t in o if t != self.eos_id], skip_special_tokens=True).strip()
                for o in out]

    # ----------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, path: str, eval_results: list[str] = ()) -> None:
        """safetensors + config.yaml/config.json + LLM config + tokenizer + model card (README.md; `eval_results`:
        `python -m ville.eval --out` files for its table)."""
        save_model(self, path, eval_results)

    def save_adapter(self, path: str, base: str) -> None:
        """LoRA model -> adapter folder (peft LoRA + the other trained weights + a reference to `base`; merge.py)."""
        from .merge import save_adapter

        save_adapter(self, path, base)

    def push_to_hub(self, repo_id: str, eval_results: list[str] = (), private: bool = False,
                    token: str | None = None) -> str:
        """Save to a temporary folder and upload it as hub model `repo_id` (huggingface_hub's upload API)."""
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, repo_id.split("/")[-1])
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, eval_results, private=private, token=token)

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu") -> "ViLLE":
        """A saved folder, a run's out_dir (its final/), an adapter folder (onto its base), or a hub id."""
        return load_model(cls, path, map_location)

    def load_weights(self, path: str, strict: bool = False):
        """Partial loading (stage N+1 from stage N's final model). Returns a LoadReport."""
        return load_weights(self, path, strict=strict)


def model_summary(model: ViLLE) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "hidden": model.hidden,
            "video_tokens_per_frame": model.vision.tokens_per_frame, "vocab": len(model.tokenizer)}


__all__ = ["ViLLE", "ModelCfg", "EmbedCfg", "EmbedOutput", "EmbedSteps", "model_summary"]
