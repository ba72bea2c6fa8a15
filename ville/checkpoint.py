"""Model save/load: safetensors weights + resolved config + LLM config + tokenizer, in one folder.

A saved folder rebuilds without the hub: the LLM is built from its saved config and the tokenizer from its saved
files. Partial loading (stage N+1 initialised from stage N) matches keys up to peft's wrapping, so a LoRA model
loads a non-LoRA checkpoint (and vice versa), and reports missing / unexpected / shape-mismatched keys.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_model as st_save_model

WEIGHTS = "model.safetensors"


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (newly initialised)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model (ignored)
    mismatched: list[str] = field(default_factory=list)  # same key, different shape (left initialised)
    loaded: int = 0

    def __str__(self) -> str:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        return (f"loaded {self.loaded} tensors; missing {len(self.missing)} [{show(self.missing)}]; unexpected "
                f"{len(self.unexpected)} [{show(self.unexpected)}]; mismatched {len(self.mismatched)} "
                f"[{show(self.mismatched)}]")


def canonical_key(key: str) -> str:
    """Strip peft's wrapping so LoRA and plain models share key names."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def save_model(model, path: str) -> None:
    """Write into `path.tmp` then rename, so a crash never leaves a half-written model folder under `path`."""
    from .config import to_yaml

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(to_yaml(model.cfg))
    model.base_llm().config.save_pretrained(os.path.join(tmp, "llm_config"))
    model.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    st_save_model(model, os.path.join(tmp, WEIGHTS))  # de-duplicates tied tensors (embeddings / LM head)
    if os.path.exists(path):
        old = path.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def load_weights(model, path: str, strict: bool = False, map_location: str = "cpu") -> LoadReport:
    file = os.path.join(path, WEIGHTS) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no weights at {file!r} (expected a folder written by save_pretrained)")
    saved = {canonical_key(k): v for k, v in load_file(file, device=map_location).items()}
    own = model.state_dict()
    by_canon = {canonical_key(k): k for k in own}
    report = LoadReport()
    to_load, skipped = {}, set()
    for ck, tensor in saved.items():
        if ck not in by_canon:
            report.unexpected.append(ck)
        elif own[by_canon[ck]].shape != tensor.shape:
            report.mismatched.append(f"{ck} {tuple(tensor.shape)} vs {tuple(own[by_canon[ck]].shape)}")
            skipped.add(by_canon[ck])
        else:
            to_load[by_canon[ck]] = tensor
    # Tied tensors are stored once; a missing key sharing storage with a loaded one is not missing.
    loaded_ptrs = {own[k].data_ptr() for k in to_load}
    report.missing = [canonical_key(k) for k in own
                      if k not in to_load and k not in skipped and own[k].data_ptr() not in loaded_ptrs]
    report.loaded = len(to_load)
    model.load_state_dict(to_load, strict=False)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(f"{file}: weights do not match the model: {report}")
    return report


def resolve_model_dir(path: str) -> str:
    """A folder written by save_pretrained, or a training run's `out_dir` (its model is `out_dir/final`)."""
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return path
    final = os.path.join(path, "final")
    if os.path.isfile(os.path.join(final, "config.yaml")):
        return final
    if os.path.isdir(path):
        raise ValueError(f"{path}: no saved model here (no config.yaml); a training run saves its model to "
                         f"{final} when it finishes")
    raise ValueError(f"{path}: no such model folder")


def load_model(cls, path: str, map_location: str = "cpu"):
    from transformers import AutoTokenizer

    from .config import ModelCfg, read_yaml, structured

    path = resolve_model_dir(path)
    cfg_file = os.path.join(path, "config.yaml")
    cfg = structured(cfg_file, ModelCfg, read_yaml(cfg_file))
    cfg.vision.pretrained, cfg.vision.checkpoint, cfg.llm.pretrained = False, None, False  # weights come from here
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    model = cls(cfg, tokenizer=tokenizer, _saved_llm_config=os.path.join(path, "llm_config"))
    load_weights(model, path, strict=True, map_location=map_location)
    return model.to(map_location)


def model_identity(path: str) -> str:
    """A short content hash of a saved model: its weights and its `config.yaml` (the stop rule and token limits live
    there, so editing them changes what the model embeds). The search index checks queries against it, and the
    evaluation cache is keyed by it."""
    import hashlib

    path = resolve_model_dir(path)
    h = hashlib.sha256()
    with open(os.path.join(path, WEIGHTS), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    cfg_file = os.path.join(path, "config.yaml")
    if os.path.exists(cfg_file):
        with open(cfg_file, "rb") as f:
            h.update(b"config.yaml\0" + f.read())
    return h.hexdigest()[:16]




# ------------------------------------------------------------------------------------------------ training state
STATE_PREFIX = "step-"


def _state_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"{STATE_PREFIX}{step:08d}.pt")


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(out_dir: str, step: int, state: dict, keep_last: int) -> str:
    """Atomic: written to `*.tmp`, flushed to disk, then renamed. A kill at any moment leaves either the previous
    complete checkpoints or the new one, never a partial file under a checkpoint's name."""

    path = _state_path(out_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_train_states(out_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(old)
    return path


def list_train_states(out_dir: str) -> list[str]:
    folder = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith(STATE_PREFIX) and n.endswith(".pt"))
    return [os.path.join(folder, n) for n in names]


def latest_train_state(out_dir: str) -> str | None:
    """The newest complete checkpoint; stale `*.tmp` files from a killed save are removed."""
    folder = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(folder):
        for n in os.listdir(folder):
            if n.endswith(".tmp"):
                os.remove(os.path.join(folder, n))
    states = list_train_states(out_dir)
    return states[-1] if states else None
