"""Start from a pretrained VLM: PaliGemma 1 and 2 (any resolution) -> ville's tower, projector, LLM and tokenizer.

PaliGemma, the paper's starting point, is the same three parts ville has (a SigLIP ViT, one linear projector, a
Gemma / Gemma-2 decoder used as a prefix-LM), so starting from it is a renaming of its weights. The architecture comes
from the checkpoint's `config.json` (`resolve`): the tower is the matching timm `vit_so400m_patch14_siglip_*` (or
a timm SigLIP ViT given the checkpoint's sizes), the LLM a causal LM built from `text_config`.

| PaliGemma checkpoint key (after the layout prefix)             | ville parameter                                 |
|----------------------------------------------------------------|-------------------------------------------------|
| `vision.embeddings.patch_embedding.{weight,bias}`              | `vision.trunk.patch_embed.proj.{weight,bias}`   |
| `vision.embeddings.position_embedding.weight` (N, C)           | `vision.trunk.pos_embed` (1, N, C)              |
| `vision.encoder.layers.i.layer_norm{1,2}`                      | `vision.trunk.blocks.i.norm{1,2}`               |
| `vision.encoder.layers.i.self_attn.{q,k,v}_proj`               | `vision.trunk.blocks.i.attn.qkv` (rows q, k, v) |
| `vision.encoder.layers.i.self_attn.out_proj`                   | `vision.trunk.blocks.i.attn.proj`               |
| `vision.encoder.layers.i.mlp.fc{1,2}`                          | `vision.trunk.blocks.i.mlp.fc{1,2}`             |
| `vision.post_layernorm`                                        | `vision.trunk.norm`                             |
| `vision.head.*` (SigLIP's pooling head)                        | not used (PaliGemma reads the last hidden state)|
| `multi_modal_projector.linear.{weight,bias}`                   | `projector.net.{weight,bias}` (kind: linear)    |
| `language_model.{embed_tokens,layers.i.*,norm}`                | `llm.model.{...}` (same names below)            |
| `lm_head.weight` (tied to the embeddings)                      | `llm.lm_head.weight`                            |

Layout prefixes: hub checkpoints and transformers' save_pretrained write `vision_tower.vision_model.` or
`vision_tower.`, `multi_modal_projector.`, `language_model.model.` and `language_model.lm_head.`; transformers 5's
module names add a leading `model.` and drop the inner `.model`; every one of them is read.

No rescaling: transformers 5 returns `projector(last_hidden_state)` as the image features and scales only token rows
by sqrt(hidden) (inside Gemma's embedding layer); 4.x divided image features by sqrt(hidden) and multiplied every
input row by it, the same numbers. ville's video tokens are `projector(tower(frame))` and its token rows come from the
same scaled embedding, so tests/ville/test_vlm.py finds them equal to transformers' within fp32 rounding.

What ville adds starts where PaliGemma is: the temporal position embedding is zero, the projector's columns for the
change channels (`vision.motion`) are zero, and ville's own token rows (`<emb>`, `<eoe>`, `<match>`, and rows past the
checkpoint's vocabulary) are the mean of the loaded rows plus transformers' mean-resizing noise (diagonal covariance
x 1e-5). Not equal, by design of ville's attention: a Gemma-2 local layer restricts ville's prefix to the sliding
window too, while PaliGemma lets the whole prefix see itself (only when the prefix is longer than the window: 4096).
"""
from __future__ import annotations

import copy
import json
import os
import re

import torch

from .config import ModelCfg

SIGLIP_SO400M = dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, intermediate=4304)
_HF_TO_TIMM_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Keys of transformers' text config that describe the VLM wrapper or runtime, not the decoder.
_NOT_ARCHITECTURE = ("transformers_version", "use_cache", "num_image_tokens", "use_bidirectional_attention", "dtype",
                     "torch_dtype", "architectures", "_name_or_path")
_CONFIG_FILES = ["config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json"]


def _fetch(source: str, patterns: list[str]) -> str:
    """A local folder as is; a hub id through huggingface_hub's cache (only the files matching `patterns`)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise ValueError(f"model.init_from_vlm: {source!r} is a file; expected a checkpoint folder or a hub id")
    from .hub import download

    return download(source, allow_patterns=patterns, key="model.init_from_vlm")


def vision_arch(vc) -> tuple[str, dict]:
    """transformers' SiglipVisionConfig -> (timm model name, overrides) that build the same ViT."""
    if vc.model_type != "siglip_vision_model":
        raise ValueError(f"model.init_from_vlm: vision_config.model_type {vc.model_type!r} is not a SigLIP tower")
    if vc.hidden_act not in _HF_TO_TIMM_ACT:
        raise ValueError(f"model.init_from_vlm: vision_config.hidden_act {vc.hidden_act!r} has no timm equivalent "
                         f"(known: {sorted(_HF_TO_TIMM_ACT)})")
    if vc.layer_norm_eps != 1e-6:  # timm's ViT LayerNorm; a recipe cannot pass another through YAML
        raise ValueError(f"model.init_from_vlm: vision_config.layer_norm_eps {vc.layer_norm_eps} != 1e-6 (timm's)")
    C, inter = vc.hidden_size, vc.intermediate_size
    sizes = dict(patch_size=vc.patch_size, embed_dim=C, depth=vc.num_hidden_layers, num_heads=vc.num_attention_heads)
    # timm's SigLIP ViTs use exact GELU; SigLIP (and so PaliGemma) was trained with the tanh approximation.
    act = {"act_layer": _HF_TO_TIMM_ACT[vc.hidden_act]}
    if {**sizes, "intermediate": inter} == SIGLIP_SO400M:
        import timm

        name = f"vit_so400m_patch14_siglip_{vc.image_size}"
        if timm.is_model(name):
            return name, act
        return "vit_so400m_patch14_siglip_224", {"img_size": vc.image_size, **act}
    # timm sizes the MLP as int(C * mlp_ratio); half a unit more keeps a non-integral ratio from rounding down.
    ratio = inter / C if int(C * (inter / C)) == inter else (inter + 0.5) / C
    return "vit_base_patch16_siglip_224", {"img_size": vc.image_size, **sizes, "mlp_ratio": ratio, **act}


def llm_arch(tc) -> dict:
    """transformers' text config -> ville's `model.llm.config` (AutoConfig.for_model keys)."""
    arch = {k: v for k, v in tc.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}
    arch["model_type"] = tc.model_type
    return arch


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))


class VLMCheckpoint:
    """A PaliGemma checkpoint: its config now, its weights (safetensors only, read lazily) when loaded."""

    def __init__(self, source: str):
        from transformers import AutoConfig

        self.source = source
        self.folder = _fetch(source, _CONFIG_FILES)
        if not os.path.isfile(os.path.join(self.folder, "config.json")):
            raise ValueError(f"model.init_from_vlm: {source!r} has no config.json (a PaliGemma checkpoint expected)")
        self.config = AutoConfig.from_pretrained(self.folder)
        if self.config.model_type != "paligemma":
            raise ValueError(f"model.init_from_vlm: {source!r} is a {self.config.model_type!r} checkpoint; only "
                             f"PaliGemma 1 and 2 ('paligemma') are mapped")

    def resolve(self, cfg: ModelCfg) -> ModelCfg:
        """cfg with its architecture keys (tower, LLM, tokenizer) replaced by the checkpoint's."""
        if cfg.projector.kind != "linear":
            raise ValueError(f"model.projector.kind: PaliGemma's projector is linear, got {cfg.projector.kind!r} "
                             f"(set model.projector.kind=linear with model.init_from_vlm)")
        cfg = copy.deepcopy(cfg)
        cfg.vision.name, cfg.vision.overrides = vision_arch(self.config.vision_config)
        cfg.vision.pretrained, cfg.vision.checkpoint = False, None
        cfg.llm.name, cfg.llm.pretrained, cfg.llm.config = None, False, llm_arch(self.config.text_config)
        if _has_tokenizer(self.folder):
            cfg.llm.tokenizer = self.source
        return cfg

    # ------------------------------------------------------------------------------------------------ weights
    def _weight_files(self) -> list[str]:
        folder = _fetch(self.source, ["*.json", "*.safetensors"])
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, n) for n in names]
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single):
            return [single]
        raise ValueError(f"model.init_from_vlm: {self.source!r} has no model.safetensors(.index.json); only "
                         f"safetensors are read (pickled .bin files can run code when opened)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint under ville's names (`vision.trunk.`, `projector.net.`, `llm.`)."""
        from safetensors import safe_open

        raw = {}
        for file in self._weight_files():
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    raw[key] = f.get_tensor(key)
        return map_state_dict(raw, self.source)

    def load_into(self, model) -> None:
        """Copy the checkpoint into a ViLLE built from `resolve(cfg)`; every tower, projector and LLM weight must be
        covered. A model on the meta device (a dry run) only takes the architecture."""
        if any(p.is_meta for p in model.parameters()):
            return
        load_mapped(model, self.state_dict(), self.source)


_VISION_RULES = [  # (regex on the key after the tower prefix, timm name); qkv is assembled separately
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
]
_PREFIXES = [  # checkpoint prefix -> part; longest first
    ("vision_tower.vision_model.", "vision"), ("vision_tower.", "vision"),
    ("multi_modal_projector.linear.", "projector"),
    ("language_model.model.", "llm"), ("language_model.lm_head.", "lm_head"), ("lm_head.", "lm_head"),
    ("language_model.", "llm"),
]


def map_state_dict(raw: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """PaliGemma keys (any layout above) -> ville keys. Unknown keys fail, naming the first few."""
    out, qkv, unknown = {}, {}, []
    for key, t in raw.items():
        k = key[len("model."):] if key.startswith("model.") else key
        part = next(((p, rest) for p, rest in _PREFIXES if k.startswith(p)), None)
        if part is None:
            unknown.append(key)
            continue
        prefix, where = part
        k = k[len(prefix):]
        if where == "projector":
            out[f"projector.net.{k}"] = t
        elif where == "llm":
            out[f"llm.model.{k}"] = t
        elif where == "lm_head":
            out[f"llm.lm_head.{k}"] = t
        elif k.startswith("head."):
            continue
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = t
        else:
            for pattern, repl in _VISION_RULES:
                if re.fullmatch(pattern, k):
                    name = re.sub(pattern, repl, k)
                    out[f"vision.trunk.{name}"] = t[None] if name == "pos_embed" else t
                    break
            else:
                unknown.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"model.init_from_vlm: {source!r}: layer {layer} lacks {sorted({'q', 'k', 'v'} - set(parts))}"
                             f"_proj.{kind}")
        out[f"vision.trunk.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if unknown:
        raise ValueError(f"model.init_from_vlm: {source!r}: {len(unknown)} keys not in PaliGemma's layout: "
                         f"{unknown[:5]}")
    return out


@torch.no_grad()
def load_mapped(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy mapped PaliGemma weights into `model` (see the module docstring for what ville's own parts start at)."""
    from .checkpoint import canonical_key
    from .tokenizer import EMBED_MODE_TOKENS

    trunk = model.vision.trunk
    tower = {k[len("vision.trunk."):]: v for k, v in weights.items() if k.startswith("vision.trunk.")}
    try:
        trunk.load_state_dict(tower, strict=True)
    except RuntimeError as e:
        raise ValueError(f"model.init_from_vlm: {source!r}: the tower does not match "
                         f"{model.cfg.vision.name}: {str(e).splitlines()[1].strip()}") from e
    model.vision.temporal_pos.zero_()

    lin = model.projector.net
    w, b = weights["projector.net.weight"], weights["projector.net.bias"]
    if w.shape[0] != lin.weight.shape[0] or w.shape[1] > lin.weight.shape[1]:
        raise ValueError(f"model.init_from_vlm: {source!r}: projector {tuple(w.shape)} does not fit "
                         f"{tuple(lin.weight.shape)}")
    lin.weight.zero_()
    lin.weight[:, : w.shape[1]] = w  # motion's change channels start at zero
    lin.bias.copy_(b)

    llm = model.base_llm()
    own = {canonical_key(k): v for k, v in llm.state_dict().items() if "lora_" not in k}
    embed_key = "model.embed_tokens.weight"
    table = own[embed_key]
    loaded = {k[len("llm."):]: v for k, v in weights.items() if k.startswith("llm.")}
    if embed_key not in loaded:
        raise ValueError(f"model.init_from_vlm: {source!r} has no language_model embed_tokens")
    src = loaded.pop(embed_key)
    old_mean = table.float().mean(0)
    n = min(src.shape[0], table.shape[0])
    table[:n] = src[:n]
    mean, std = src.float().mean(0), src.float().std(0)
    tok = model.tokenizer
    new_rows = sorted(set(range(n, table.shape[0])) | {tok.convert_tokens_to_ids(t) for t in EMBED_MODE_TOKENS})
    noise = torch.randn(len(new_rows), table.shape[1]) * (1e-5 ** 0.5) * std
    table[new_rows] = (mean + noise).to(table.dtype)
    head = own.get("lm_head.weight")
    if head is not None and head.data_ptr() != table.data_ptr():
        if "lm_head.weight" in loaded:
            head[:n] = loaded.pop("lm_head.weight")[:n]
            head[new_rows] = table[new_rows]
        else:
            raise ValueError(f"model.init_from_vlm: {source!r}: the LLM unties its head but the checkpoint has none")
    loaded.pop("lm_head.weight", None)
    missing = [k for k in own if k not in loaded and k not in (embed_key, "lm_head.weight")]
    extra = [k for k in loaded if k not in own]
    if missing or extra:
        raise ValueError(f"model.init_from_vlm: {source!r}: LLM weights do not match {llm.config.model_type}: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    for k, v in loaded.items():
        if own[k].shape != v.shape:
            raise ValueError(f"model.init_from_vlm: {source!r}: {k} is {tuple(v.shape)}, ville's {tuple(own[k].shape)}")
        own[k].copy_(v)
    # The learned step and matching inputs are derived from the table as ViLLE.__init__ derives them.
    model.emb_query.copy_(table[model.emb_id].float())
    model.match_query.add_(table.float().mean(0) - old_mean)
