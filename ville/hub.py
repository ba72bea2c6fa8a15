"""Hugging Face Hub conventions for a saved model folder: a `config.json` that names the real architecture, a model
card (`README.md`: recipe, data, evaluation table), loading from a hub id, and pushing through huggingface_hub's
upload API. The folder itself stays ville's (`ville/checkpoint.py`): safetensors weights, `config.yaml`, the LLM's
config and the tokenizer, so a downloaded snapshot loads exactly like a local folder.

    python -m ville.hub push runs/stage3/final you/ville-stage3 [--eval eval_out/stage3-test.json] [--private]
"""
from __future__ import annotations

import argparse
import json
import os
import re

CARD = "README.md"
CONFIG_JSON = "config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path (a folder of that name wins)."""
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def download(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None,
             key: str | None = None) -> str:
    """The local snapshot folder of a hub model repository (huggingface_hub's cache), only the files matching
    `allow_patterns` if given. A failure is one ValueError line naming the repository (and the recipe `key`)."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except Exception as e:  # offline, gated, private, typo'd id
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if key:
            raise ValueError(f"{key}: could not fetch {repo_id!r} from the hub (a local folder or hub id expected; "
                             f"{type(e).__name__}: {first})") from e
        raise ValueError(f"{repo_id}: not a local folder, and the hub has no model there ({type(e).__name__}: "
                         f"{first})") from e


def architecture(model) -> dict:
    """What `config.json` says about a model: its real parts, read from the built modules (not from hub names the
    recipe may have carried)."""
    cfg, llm = model.cfg, model.base_llm().config
    lora = cfg.llm.lora
    return {
        "architectures": ["ViLLE"], "model_type": "ville", "library_name": "ville",
        "vision": {"timm_model": cfg.vision.name, "overrides": dict(cfg.vision.overrides),
                   "input_size": list(model.vision.input_size), "width": model.vision.width,
                   "tokens_per_frame": model.vision.tokens_per_frame, "max_frames": cfg.vision.max_frames,
                   "motion": cfg.vision.motion},
        "projector": cfg.projector.kind,
        "llm": {"architecture": type(model.base_llm()).__name__, "model_type": llm.model_type,
                "hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_hidden_layers,
                "vocab_size": model.base_llm().get_input_embeddings().num_embeddings},
        "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules)} if lora.enabled
        else None,
        "init_from_vlm": cfg.init_from_vlm,
        "embedding_dim": cfg.head.dim,
        "max_embed_tokens": cfg.embed.max_embed_tokens,
    }


def _eval_table(results_files: list[str], identity: str | None) -> list[str]:
    lines = []
    for path in results_files:
        with open(path) as f:
            res = json.load(f)
        meta = res.get("meta", {})
        if identity and meta.get("model_identity") not in (None, identity):
            raise ValueError(f"{path}: results of model {meta.get('model_identity')}, not of this folder's "
                             f"({identity})")
        lines += [f"`{os.path.basename(path)}`: split `{meta.get('split', '?')}`, {meta.get('date', 'undated')}, "
                  f"{meta.get('device_name', '?')}", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in res.items():
            if task == "meta" or not isinstance(metrics, dict):
                continue
            for name, value in _flat(metrics):
                lines.append(f"| {task} | {name} | {value:.4g} |")
        lines.append("")
    return lines


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def write_model_card(folder: str, eval_results: list[str] = (), repo_id: str | None = None,
                     identity: str | None = None) -> str:
    """README.md from what the folder holds: config.json, recipe.yaml (the training run's, when present) and the
    given evaluation result files (`python -m ville.eval --out`; refused when they are of another model)."""
    with open(os.path.join(folder, CONFIG_JSON)) as f:
        arch = json.load(f)
    recipe_file = os.path.join(folder, "recipe.yaml")
    recipe = open(recipe_file).read() if os.path.isfile(recipe_file) else None
    adapter = os.path.join(folder, "base.json")
    base = json.load(open(adapter))["base"] if os.path.isfile(adapter) else arch.get("init_from_vlm")
    front = ["---", "library_name: ville", "tags: [video, video-text-retrieval, embeddings, prefix-lm]"]
    if base and is_hub_id(base):
        front.append(f"base_model: {base}")
    name = repo_id or os.path.basename(os.path.abspath(folder))
    v, llm = arch["vision"], arch["llm"]
    lines = front + ["---", "", f"# {name}", "",
                     "A ViLL-E-style video LLM trained with ville: video frames -> "
                     f"`{v['timm_model']}` ({v['tokens_per_frame']} tokens per frame, up to {v['max_frames']} frames) "
                     f"-> {arch['projector']} projector -> `{llm['architecture']}` ({llm['num_hidden_layers']} layers,"
                     f" width {llm['hidden_size']}) as a prefix-LM -> adaptive-length KV-Former embedding "
                     f"({arch['embedding_dim']}-d, up to {arch['max_embed_tokens']} steps).", ""]
    if arch.get("init_from_vlm"):
        lines += [f"Initialised from `{arch['init_from_vlm']}` (tower, projector, LLM, tokenizer).", ""]
    if os.path.isfile(adapter):
        lines += [f"LoRA adapter (peft format) on `{base}`; `python -m ville.merge` writes the merged model.", ""]
    lines += ["## Use", "", "```python", "from ville import ViLLE", "",
              f'model = ViLLE.from_pretrained("{repo_id or folder}").eval()',
              "emb = model.embed_video(frames)  # uint8 (B, T, H, W, 3) -> EmbedOutput", "```", ""]
    if recipe is not None:
        from omegaconf import OmegaConf

        data = OmegaConf.create(recipe).get("data")
        shards = {k: data[k] for k in ("train_shards", "val_shards", "test_shards") if data and data.get(k)}
        lines += ["## Data", "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(shards)).rstrip(), "```", "",
                  "## Training recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    else:
        lines += ["## Training recipe", "", "Not recorded in this folder (a training run writes `recipe.yaml`).", ""]
    lines += ["## Evaluation", ""]
    if eval_results:
        from .checkpoint import model_identity

        lines += _eval_table(list(eval_results), identity or model_identity(folder))
    else:
        lines += ["No results attached.", ""]
    text = "\n".join(lines)
    with open(os.path.join(folder, CARD), "w") as f:
        f.write(text)
    return text


def push_folder(folder: str, repo_id: str, eval_results: list[str] = (), private: bool = False,
                token: str | None = None, commit_message: str = "Upload ville model") -> str:
    """Refresh the card (the run's recipe.yaml and any results are there by now), create the repository if needed and
    upload the folder in one commit. Returns the commit URL."""
    from huggingface_hub import HfApi

    from .checkpoint import model_identity

    write_model_card(folder, eval_results, repo_id=repo_id, identity=model_identity(folder))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ville.hub", description="Push a saved ville model to the Hub.")
    sub = p.add_subparsers(dest="cmd", required=True)
    push = sub.add_parser("push", help="upload a model folder (written by save_pretrained or ville.merge)")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--eval", nargs="*", default=[], help="evaluation result files for the card's table")
    push.add_argument("--private", action="store_true")
    a = p.parse_args(argv)
    from .checkpoint import resolve_model_dir

    try:
        print(push_folder(resolve_model_dir(a.folder), a.repo_id, a.eval, a.private))
    except ValueError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
