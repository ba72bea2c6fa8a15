"""LoRA adapters: a LoRA stage's model as a small folder users can share, loaded onto its base, or merged into one.

An adapter folder (`save_adapter`) holds what the stage changed and a reference to what it did not:
- `adapter_model.safetensors` + `adapter_config.json`: the LLM's LoRA weights in peft's format (`PeftModel`);
- `trainable.safetensors`: every other parameter the stage trained (projector, heads, learned queries, temperature,
  stop biases, temporal position; the tower too when it was not frozen), under ville's names;
- `base.json`: the base (a folder written by `save_pretrained`, or a hub id) and its content identity, checked on
  loading so an adapter never lands silently on a base that changed;
- `config.yaml` (the trained model's, LoRA on), `config.json` and the model card `README.md`, as a full model has.

Loading (`ViLLE.from_pretrained` of an adapter folder) builds the LoRA model on the base's LLM config and tokenizer,
loads the base, then the two adapter files, and refuses any key left over or unfilled: the result is the trained
model tensor for tensor. Merging folds the LoRA product into the base weights and writes an ordinary model folder:

    python -m ville.merge runs/stage3/adapter runs/stage3/merged
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINABLE = "trainable.safetensors"
BASE = "base.json"


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and os.path.isfile(os.path.join(path, BASE))


def _base_dir(base: str) -> str:
    from .checkpoint import resolve_model_dir
    from .hub import download, is_hub_id

    return download(base) if is_hub_id(base) else resolve_model_dir(base)


def save_adapter(model, path: str, base: str) -> None:
    """Write `model`'s adapter to `path` (atomically: `path.tmp`, then renamed). `base`: the model the stage started
    from (a saved folder or a hub id); its non-LoRA, non-trainable weights must be the model's own."""
    from safetensors.torch import save_file

    from .checkpoint import model_identity
    from .config import to_yaml
    from .hub import CONFIG_JSON, architecture, write_model_card

    if not model.cfg.llm.lora.enabled:
        raise ValueError("save_adapter: the model has no LoRA (model.llm.lora.enabled: false); use save_pretrained")
    base_dir = _base_dir(base)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.llm.save_pretrained(tmp, save_embedding_layers=False)
    trained = {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad and "lora_" not in k}
    save_file(trained, os.path.join(tmp, TRAINABLE))
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(to_yaml(model.cfg))
    with open(os.path.join(tmp, BASE), "w") as f:
        json.dump({"base": base, "base_path": os.path.abspath(base_dir), "base_identity": model_identity(base_dir)},
                  f, indent=2)
    with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
        json.dump(architecture(model), f, indent=2)
    write_model_card(tmp)  # replaces peft's generic card
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _find_base(path: str, meta: dict) -> str:
    from .checkpoint import model_identity
    from .hub import is_hub_id

    for candidate in (meta["base"], meta.get("base_path")):
        if candidate and (os.path.isdir(candidate) or is_hub_id(candidate)):
            base_dir = _base_dir(candidate)
            found = model_identity(base_dir)
            if found != meta["base_identity"]:
                raise ValueError(f"{path}: its base {candidate} is not the model it was trained on (identity "
                                 f"{found}, the adapter expects {meta['base_identity']})")
            return base_dir
    raise ValueError(f"{path}: its base {meta['base']!r} is not here (also looked at {meta.get('base_path')!r}); "
                     f"put the base model there or edit {BASE}")


def load_adapter(cls, path: str, map_location: str = "cpu"):
    """The trained LoRA model: its base, then the adapter's LoRA and trainable weights (every key accounted for)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from .checkpoint import load_weights
    from .config import ModelCfg, read_yaml, structured

    with open(os.path.join(path, BASE)) as f:
        base_dir = _find_base(path, json.load(f))
    cfg_file = os.path.join(path, "config.yaml")
    cfg = structured(cfg_file, ModelCfg, read_yaml(cfg_file))
    cfg.vision.pretrained, cfg.vision.checkpoint, cfg.llm.pretrained = False, None, False
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(base_dir, "tokenizer"))
    model = cls(cfg, tokenizer=tokenizer, _saved_llm_config=os.path.join(base_dir, "llm_config"))
    trained = load_file(os.path.join(path, TRAINABLE), device=map_location)
    report = load_weights(model, base_dir, map_location=map_location)
    # What the stage trained may be new or reshaped (a longer stop-bias table): the adapter's own copy fills it.
    unfilled = [k for k in report.missing if "lora_" not in k and k not in trained]
    reshaped = [m for m in report.mismatched if m.split(" ")[0] not in trained]
    if unfilled or report.unexpected or reshaped:
        raise ValueError(f"{path}: base {base_dir} does not fit the adapter's model: {report}")
    result = set_peft_model_state_dict(model.llm, load_file(os.path.join(path, ADAPTER_WEIGHTS), device=map_location))
    if result.unexpected_keys:
        raise ValueError(f"{path}: {ADAPTER_WEIGHTS} has keys the model lacks: {result.unexpected_keys[:5]}")
    missing = model.load_state_dict(trained, strict=False).unexpected_keys
    if missing:
        raise ValueError(f"{path}: {TRAINABLE} has keys the model lacks: {missing[:5]}")
    return model.to(map_location)


def merge(adapter: str, out: str) -> None:
    """Fold the adapter's LoRA into its base and write an ordinary model folder (LoRA off) to `out`."""
    from .model import ViLLE

    model = load_adapter(ViLLE, adapter)
    model.llm = model.llm.merge_and_unload()
    model.cfg = replace(model.cfg, llm=replace(model.cfg.llm, lora=replace(model.cfg.llm.lora, enabled=False)))
    model.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ville.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="an adapter folder (a LoRA run's out_dir/adapter)")
    p.add_argument("out", help="where to write the merged model")
    a = p.parse_args(argv)
    try:
        merge(a.adapter, a.out)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
