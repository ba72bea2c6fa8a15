"""Recipes: YAML files whose sections fill the stages' config dataclasses, then dotted `key=value` overrides.

Every section's dataclass lives here, in the pipeline's order (vision tower, projector, LLM, embedding head, model,
data, losses, optimiser, training, evaluation), and each stage module re-exports its own (`ville.vision.VisionCfg`
is this VisionCfg). They are kept torch-free in one module so that a recipe is read and checked, and `--help`
answers, without importing torch, transformers or timm (seconds each; docs/design.md, "Fast answers").

Unknown keys and wrong types fail loudly, naming the key and the file (OmegaConf structured configs check both).
A recipe may start with a `#!` line (recipes are executable: `./recipes/tiny/stage1.yaml`); YAML treats it as a
comment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def _fail(path: str, e: OmegaConfBaseException, what: str = "") -> ValueError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    return ValueError(f"{path}: {what}{'key ' + repr(key) + ': ' if key else ''}{msg}")


def read_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: a recipe must be a mapping of sections, got {type(cfg).__name__}")
    return cfg


def apply_overrides(path: str, raw: DictConfig, overrides: list[str] | None) -> DictConfig:
    if not overrides:
        return raw
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be dotted key=value, got {bad}")
    try:
        return OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _fail(path, e, "override ") from e


def structured(path: str, schema: type[T], data: Any, prefix: str = "") -> T:
    """Fill dataclass `schema` from `data`; unknown keys / wrong types -> ValueError naming key and file."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, data if data is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        e.full_key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        raise _fail(path, e) from e


def load_section(path: str, section: str, schema: type[T], overrides: list[str] | None = None) -> T:
    raw = apply_overrides(path, read_yaml(path), overrides)
    if section not in raw:
        raise ValueError(f"{path}: missing section {section!r}")
    return structured(path, schema, raw[section], prefix=section)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


# ------------------------------------------------------------------------------------------------ the recipe's sections
@dataclass
class VisionCfg:
    name: str = "vit_so400m_patch14_siglip_384"  # any timm model name (SigLIP family by default)
    pretrained: bool = False
    checkpoint: str | None = None  # local weights file (safetensors/bin) instead of the hub
    overrides: dict[str, Any] = field(default_factory=dict)  # timm kwargs: img_size, patch_size, embed_dim, depth ...
    max_frames: int = 12
    pool: int = 1  # spatial pooling stride over the patch grid (2 -> 4x fewer tokens)
    pool_mode: str = "avg"  # "avg" or "max" over each pool x pool cell
    motion: bool = False  # append each token's change since the previous frame (output width 2C; module docstring)
    freeze: bool = False
    grad_checkpointing: bool = False


@dataclass
class ProjectorCfg:
    kind: str = "mlp"  # "linear" | "mlp"


@dataclass
class LoRACfg:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class MomentAdapterCfg:
    # Low-rank deltas on the LLM's linear layers that are switched on only while localisation windows and moment
    # queries are embedded (training and evaluation; ville/adapter.py). r = 0: none (every recipe before issue 24's
    # last stage-3 change, and checkpoints saved without the key).
    r: int = 0
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    # The moment passes train the adapter alone: the LLM, the embedding head, the projector, the token embeddings
    # and the temperature see them through detached copies, so localisation cannot move what retrieval uses.
    isolate: bool = True


@dataclass
class LLMCfg:
    # Hub name or local path of the pretrained decoder; only read when pretrained=true (a random decoder is described
    # by `config` alone, so a saved tiny model's config.yaml names no checkpoint it was not built from).
    name: str | None = None
    pretrained: bool = False
    # Used when pretrained=false: AutoConfig.for_model(**config) builds a randomly initialised decoder, so a recipe
    # builds without the hub. Must contain model_type (gemma2, llama, qwen2, ...).
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "builtin"  # "builtin" or a hub name / local path
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16
    lora: LoRACfg = field(default_factory=LoRACfg)
    grad_checkpointing: bool = False
    # Full-sequence attention path (ville/attention.py): auto | flex | sdpa | chunked | eager (the reference).
    attention: str = "auto"


@dataclass
class HeadCfg:
    num_pool_tokens: int = 32  # P
    width: int = 512  # attention/MLP width inside the head
    num_heads: int = 8
    mlp_ratio: float = 2.0
    dim: int = 512  # D, the embedding dimension


@dataclass
class EmbedCfg:
    max_embed_tokens: int = 16
    min_embed_tokens: int = 1
    stop_threshold: float = 0.5  # stop at the first step t >= min whose stop probability exceeds this
    video_prompt: str = "Summarize the video in embeddings."
    text_prompt: str = "Summarize the text in one embedding."
    # Composed retrieval is zero-shot (never trained): the edit text goes before the trained video prompt, so the
    # query stays in the distribution the embedding steps were trained on (a new instruction here measured worse).
    composed_prompt: str = "Summarize the video in embeddings."
    # Localisation windows (training) and moment candidates (evaluation) are embedded after this prompt instead of
    # video_prompt, so one LLM can give a clip its whole-clip embedding and a window an embedding of what happens in
    # it: with one prompt, the tiny stage 3 could learn moments only at retrieval's expense (docs/design.md).
    # "" = video_prompt (checkpoints saved before the key load with it).
    moment_prompt: str = ""
    # The same for the moment query's text (localisation training, moment evaluation); "" = text_prompt.
    moment_text_prompt: str = ""
    match_prompt: str = "Does the video match the text?"
    # The stop logit also reads the video's motion energy through learned weights (`stop_motion`; needs
    # model.vision.motion; ville/model.py `encode_video`).
    stop_motion: bool = False
    # 0: one weight on the log of the clip's mean motion energy. k >= 2: k weights on the logs of k evenly spaced
    # quantiles (min .. max) of the per-frame change energies of frames 2..T, i.e. of how many frames change how much
    # (a probe on val found the event count there with Spearman 0.83, against 0.68 from the clip's mean; design.md).
    stop_motion_quantiles: int = 0
    init_temperature: float = 0.05  # contrastive temperature at init (learned as logit_scale = 1 / temperature)
    max_logit_scale: float = 100.0


@dataclass
class ModelCfg:
    vision: VisionCfg = field(default_factory=VisionCfg)
    projector: ProjectorCfg = field(default_factory=ProjectorCfg)
    llm: LLMCfg = field(default_factory=LLMCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    embed: EmbedCfg = field(default_factory=EmbedCfg)
    moment_adapter: MomentAdapterCfg = field(default_factory=MomentAdapterCfg)
    # A PaliGemma (1 or 2) hub id or local folder: the tower, projector, LLM and tokenizer are built from its config
    # and start from its weights (ville/vlm.py); the recipe's vision/llm architecture keys are then not read, its
    # other keys (frames, pooling, freezing, dtype, LoRA) are. None: separate towers (vision.name + llm.name/config).
    init_from_vlm: str | None = None
    max_text_tokens: int = 256  # longer texts are truncated (prompts, captions, targets)
    decode_attention: str = "auto"  # "auto": ville_kernels dispatch (Triton on CUDA); "ref": reference path
    compact_every: int = 1  # drop finished samples every k decode steps (each check syncs with the host)
    # Prefill of the embedding decode and of generation: batch rows run in slices of at most this many padded tokens
    # (rows x the batch's padded length) per decoder forward, each filling its rows of one KV cache; 0 = the whole
    # batch in one forward. A sample longer than the budget runs alone (one warning). 16384: ~2 GB of activations at
    # Gemma-2B width (docs/design.md); a real-recipe batch (3k video tokens per sample) exceeds it, a tiny one never.
    prefill_tokens_per_chunk: int = 16384


@dataclass
class DataCfg:
    # Shards: "dir/shard-{000000..000009}.tar" | ["a.tar", "b-*.tar"] | [{pattern: ..., weight: 2.0}, ...]. A
    # source's weight is its share of shard draws in the resampled training stream.
    train_shards: Any = None
    val_shards: Any = None
    test_shards: Any = None
    video_ext: str = "mp4"  # video member; a sample without it may name another in its JSON `video_ext`
    num_frames: int = 8
    frame_size: Optional[int] = None  # resize decoded frames to frame_size^2 (None: native size)
    seek: bool = True  # False decodes every frame up to the last target (same frames; for checks / benchmarks)
    num_workers: int = 0
    pin_memory: bool = False
    shuffle_buffer: int = 500  # plans (metadata only) mixed across shards
    seed: int = 0
    # Localisation: candidate windows slide at these fractions of the duration, `window_stride` x their length
    # apart; negatives have IoU < window_negative_iou with the ground truth.
    window_scales: List[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    window_stride: float = 0.5
    num_window_negatives: int = 7
    window_negative_iou: float = 0.2
    # Matching: a negative text is a caption of one of the last `matching_buffer` clips of the stream, preferably
    # one sharing a content word with the clip's own caption; about `matching_negative_fraction` are negatives.
    matching_buffer: int = 32
    matching_negative_fraction: float = 0.5
    # Hard-negative batches (caption, detailed_caption, retrieval; 1 = off): each batch is made of groups of this
    # many clips, an anchor plus the clips of the next `hard_negative_pool` plans whose texts share the most content
    # words with its text (never an identical text), so the contrastive loss must tell apart clips a random batch
    # would rarely pair (README, design choices).
    hard_negative_group: int = 1
    hard_negative_pool: int = 128
    max_consecutive_failures: int = 1000


@dataclass
class LossCfg:
    lm: float = 1.0  # captions, detailed captions and QA (next-token prediction)
    contrastive: float = 1.0  # video-text InfoNCE (symmetric)
    localisation: float = 1.0  # text vs the ground-truth window and its IoU < 0.2 hard negatives
    matching: float = 1.0  # video-text matching BCE
    composed: float = 1.0  # composed query (video + edit text) vs the edited caption: InfoNCE
    halting: float = 0.5  # BCE on the stop logits
    token_cost: float = 0.02  # per expected embedding token
    halting_margin: float = 0.05  # cosine margin of the "already ranks first" test
    halting_min_batch: int = 16  # tasks whose global batch is smaller do not feed the halting loss
    embed_steps: str = "all"  # "all": contrastive loss averaged over every prefix length; "last": step K only
    halting_target: str = "rank"  # "rank": already ranks first by the margin; "sentences": detailed-caption length
    # Swapped-word negatives (ours, after NegCLIP): a caption holding two different words of one class of
    # `swap_classes` (two colours, two shapes) gets a copy with those two words exchanged, and the video must score
    # its caption above each copy (losses.swap_loss). 0 disables.
    swap: float = 0.0
    swap_classes: list[list[str]] = field(default_factory=list)


@dataclass
class OptimCfg:
    lr: float = 1e-4  # projector, heads, learned queries, temperature
    lr_vision: float | None = None  # None: same as lr
    lr_llm: float | None = None  # full LLM weights (when not frozen by LoRA)
    lr_lora: float | None = None
    # The stop group: the per-step stop biases (model.stop_step_bias) and the motion weight (model.stop_motion). They
    # are logits and logit slopes that start at zero; Adam moves a parameter by about lr a step, so at lr they would
    # need thousands of steps to move one unit. None: 100 x lr.
    lr_stop: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables


@dataclass
class TrainCfg:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    save_every: int = 200
    keep_last: int = 2  # complete checkpoints kept
    log_every: int = 10
    seed: int = 0
    init_from: str | None = None  # previous stage's `final` folder (partial load, report printed)
    # task -> GLOBAL batch size, split evenly across ranks (so 1 and N processes see the same data). The recipe's
    # mapping replaces the default; it never merges with it.
    tasks: dict[str, int] = field(default_factory=dict)
    grad_accum: int = 1
    parallel: str = "ddp"  # "ddp" | "fsdp"
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU | "bf16" | "none"
    tensorboard: bool = True
    threads: int = 0  # torch CPU threads per process (0: torch's default)
    # > 0: the caption / retrieval contrastive batch is embedded this many samples at a time by gradient caching
    # (ville/gradcache.py): the same loss and gradients as 0, with the towers' activation memory of one chunk.
    contrastive_chunk: int = 0
    inject_nan_at_step: int = -1  # test aid: make the loss of this step NaN
    # Signals that make every rank save one checkpoint at the same step and exit 0 (schedulers send SIGTERM to the
    # whole process group; SIGUSR1 is Slurm's usual pre-emption warning, `--signal=USR1@60`). [] keeps the defaults.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])


@dataclass
class EvalCfg:
    data: str | None = None  # a synthetic-benchmark folder (python -m data_tools.synth --out ...)
    splits: list[str] = field(default_factory=lambda: ["test"])
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "rerank", "moment", "qa", "composed",
                                                      "long_text", "adaptive"])
    max_clips: int | None = None


@dataclass
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    recipe = structured(path, Recipe, apply_overrides(path, read_yaml(path), overrides))
    for key in ("max_steps", "save_every", "log_every", "grad_accum"):
        if getattr(recipe.train, key) < 1:
            raise ValueError(f"{path}: train.{key} must be >= 1, got {getattr(recipe.train, key)}")
    # Batch size 0 turns a task off, so an override can drop a recipe's task (overrides merge into the mapping).
    if any(b < 0 for b in recipe.train.tasks.values()) or not any(recipe.train.tasks.values()):
        raise ValueError(f"{path}: train.tasks must map tasks to batch sizes >= 0, at least one >= 1, got "
                         f"{recipe.train.tasks}")
    recipe.train.tasks = {t: b for t, b in recipe.train.tasks.items() if b > 0}
    if recipe.data.train_shards is None:
        raise ValueError(f"{path}: data.train_shards is required")
    return recipe
