"""Model save/load: safetensors weights + resolved config + LLM config + tokenizer, in one folder.

A saved folder rebuilds without the hub: the LLM is built from its saved config and the tokenizer from its saved
files. It also follows the Hub's conventions (ville/hub.py): `config.json` names the built architecture and
`README.md` is a model card, so the folder can be pushed as is and loaded back by its hub id. An adapter folder
(ville/merge.py) loads as its base plus the adapter. Partial loading (stage N+1 initialised from stage N) matches keys up to peft's wrapping, so a LoRA model
loads a non-LoRA checkpoint (and vice versa), and reports missing / unexpected / shape-mismatched keys.
"""
from __future__ import annotations

import contextlib
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


def save_model(model, path: str, eval_results: list[str] = (), state_dict: dict | None = None) -> None:
    """Write into `path.tmp` then rename, so a crash never leaves a half-written model folder under `path`.
    `eval_results`: evaluation result files for the model card's table. `state_dict`: the full weights when the
    model's own are sharded (FSDP2; `consolidated_state_dict`)."""
    import json

    from .config import to_yaml
    from .hub import CONFIG_JSON, architecture, write_model_card

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(to_yaml(model.cfg))
    model.base_llm().config.save_pretrained(os.path.join(tmp, "llm_config"))
    model.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    if state_dict is None:
        st_save_model(model, os.path.join(tmp, WEIGHTS))  # de-duplicates tied tensors (embeddings / LM head)
    else:
        save_consolidated(model, state_dict, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
        json.dump(architecture(model), f, indent=2)
    write_model_card(tmp, eval_results)
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
        if ck in by_canon and tensor.dim() == 0 and own[by_canon[ck]].shape == (1,):
            tensor = tensor.reshape(1)  # logit_scale / stop_motion, saved before they became (1,) for FSDP2
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
        states = os.path.join(path, "checkpoints")
        where = (f"; its training state is in {states} (resume by rerunning the recipe; train.out_dir={path})"
                 if os.path.isdir(states) else "")
        raise ValueError(f"{path}: no saved model here (no config.yaml); a training run saves its model to "
                         f"{final} when it finishes{where}")
    raise ValueError(f"{path}: no such model folder (nor an owner/name hub id)")


def load_model(cls, path: str, map_location: str = "cpu"):
    """A saved folder, a training run's out_dir, an adapter folder, or a hub id (downloaded to huggingface_hub's
    cache, then loaded the same way)."""
    from transformers import AutoTokenizer

    from .config import ModelCfg, read_yaml, structured
    from .hub import download, is_hub_id
    from .merge import is_adapter, load_adapter

    path = download(path) if is_hub_id(path) else path
    if is_adapter(path):
        return load_adapter(cls, path, map_location)
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

    from .merge import ADAPTER_WEIGHTS, BASE, TRAINABLE, is_adapter

    adapter = is_adapter(path)
    path = path if adapter else resolve_model_dir(path)
    h = hashlib.sha256()
    # An adapter is its own weights plus its base's identity (recorded in base.json).
    for name in ([ADAPTER_WEIGHTS, TRAINABLE, BASE] if adapter else [WEIGHTS]):
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    cfg_file = os.path.join(path, "config.yaml")
    if os.path.exists(cfg_file):
        with open(cfg_file, "rb") as f:
            h.update(b"config.yaml\0" + f.read())
    return h.hexdigest()[:16]




# ------------------------------------------------------------------------------------------------ training state
# A run's checkpoints: `out_dir/checkpoints/step-XXXXXXXX.pt` (torch.save of plain containers, tensors and numbers
# only, so `torch.load(weights_only=True)` reads it without running code) and beside it `step-XXXXXXXX.pt.json`,
# written at save time with the file's size and SHA-256. Resume takes the newest checkpoint that passes the check
# and loads; a bad one is named in a one-line warning and the previous one is used.
STATE_PREFIX = "step-"
STATE_FORMAT = "ville-train-state-v2"


class UnusableCheckpoint(ValueError):
    """A checkpoint that fails its check or is refused by the loader (the message names the file)."""


def train_state_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"{STATE_PREFIX}{step:08d}.pt")


def rng_state() -> dict:
    """Every RNG the loop draws from, as tensors, ints, floats and strings only (weights_only loads them)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    n = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_durably(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_train_state(out_dir: str, step: int, state: dict, keep_last: int) -> str:
    """Atomic: written to `*.tmp`, flushed to disk, then renamed. The checksum file goes in place first, so a kill at
    any moment leaves the previous complete checkpoints plus, at worst, a checksum without its checkpoint (ignored);
    never a partial file under a checkpoint's name."""
    import json

    path = train_state_path(out_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    record = {"format": STATE_FORMAT, "step": step, "bytes": os.path.getsize(tmp), "sha256": _sha256(tmp)}
    _write_durably(path + ".json", lambda f: f.write(json.dumps(record).encode()))
    os.replace(tmp, path)
    for old in list_train_states(out_dir)[:-keep_last] if keep_last > 0 else []:
        _remove_state(old)
    return path


def list_train_states(out_dir: str) -> list[str]:
    folder = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith(STATE_PREFIX) and n.endswith((".pt", SHARDED_SUFFIX)))
    return [os.path.join(folder, n) for n in names]


def load_train_state(path: str, map_location="cpu") -> dict:
    """Check `path` against the size and SHA-256 recorded at save time, then load it with weights_only=True (no
    pickled code runs). Raises UnusableCheckpoint with one line naming the file."""
    import json
    import pickle

    record_path = path + ".json"
    if not os.path.isfile(record_path):
        raise UnusableCheckpoint(f"{path}: no checksum file {os.path.basename(record_path)} (an old-format "
                                 f"checkpoint or an interrupted save); not loaded, re-create it by training again")
    try:
        with open(record_path) as f:
            record = json.load(f)
        expected_bytes, expected_sha = int(record["bytes"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnusableCheckpoint(f"{path}: unreadable checksum file {record_path} ({e})") from e
    size = os.path.getsize(path)
    if size != expected_bytes:
        raise UnusableCheckpoint(f"{path}: {size} bytes, but {expected_bytes} were written (truncated or replaced)")
    if _sha256(path) != expected_sha:
        raise UnusableCheckpoint(f"{path}: SHA-256 differs from the one written at save time (corrupted)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        import re

        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        reason = found.group(0) if found else ""
        raise UnusableCheckpoint(
            f"{path}: refused: it holds Python objects that a safe load does not allow"
            f"{' (' + reason + ')' if reason else ''}; ville's checkpoints never do, so it is a crafted file or an "
            f"old-format checkpoint (re-create it by training again)") from e
    except Exception as e:  # a file that matches its checksum but is still not a checkpoint
        raise UnusableCheckpoint(f"{path}: not loadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "step"} <= set(state):
        raise UnusableCheckpoint(f"{path}: not a ville training state (keys missing)")
    return state


def resume_train_state(out_dir: str, map_location="cpu", load_sharded=None) -> tuple[str | None, dict | None,
                                                                                      list[str]]:
    """(path, state) of the newest usable checkpoint, newest first, and one line per newer checkpoint that was
    not usable. No checkpoint at all -> (None, None, []). Checkpoints exist but none is usable -> ValueError naming
    each (a fresh start would silently overwrite the run). Stale `*.tmp` files of a killed save are removed.
    A sharded checkpoint (`*.dcp`) is loaded by `load_sharded(path)` (into the live model and optimizer; it returns
    the rest of the state, without "model" and "optimizer"). Every rank calls this and takes the same one."""
    folder = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(folder):
        for n in os.listdir(folder):
            if n.endswith(".tmp"):  # every rank may see it: another may have removed it already
                shutil.rmtree(os.path.join(folder, n), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.remove(os.path.join(folder, n))
    problems: list[str] = []
    for path in reversed(list_train_states(out_dir)):
        try:
            if path.endswith(SHARDED_SUFFIX):
                if load_sharded is None:
                    raise UnusableCheckpoint(f"{path}: a sharded checkpoint, but no model to load it into")
                return path, load_sharded(path), problems
            return path, load_train_state(path, map_location), problems
        except UnusableCheckpoint as e:
            problems.append(str(e))
    if problems:
        raise UnusableCheckpoint(f"no usable checkpoint in {folder}: " + "; ".join(problems)
                                 + "; move the folder away to start afresh")
    return None, None, []


# ------------------------------------------------------------------------------------------- sharded (FSDP2) state
# Under `train.parallel=fsdp` each rank holds a shard of every parameter and its optimizer state, so a checkpoint is
# a `torch.distributed.checkpoint` folder, `step-XXXXXXXX.dcp/`: every rank writes its own shards, rank 0 adds
# `extra.pt` (scheduler, every rank's RNG states, step; plain containers, read with weights_only) and `record.json`
# (size and SHA-256 of every file, each rank hashing the files it wrote). All of it goes into `*.dcp.tmp/` first and
# is renamed once complete, so a folder under a checkpoint's name is always whole. DCP stores each tensor with its
# global shape, so a folder loads at any world size, and into an unsharded model (world size 1) as well.
SHARDED_SUFFIX = ".dcp"
SHARDED_RECORD = "record.json"
SHARDED_EXTRA = "extra.pt"


def sharded_state_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"{STATE_PREFIX}{step:08d}{SHARDED_SUFFIX}")


def _hash_files(folder: str, names: list[str]) -> dict:
    return {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "sha256": _sha256(os.path.join(folder, n))}
            for n in names}


def _gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_sharded_state(out_dir: str, step: int, model, optimizer, extra: dict, keep_last: int) -> str:
    """Collective: every rank calls it. `extra`: {"scheduler", "rng" (one per rank), "step"} (rank 0's is written).
    Returns the checkpoint's path."""
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    path = sharded_state_path(out_dir, step)
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _gather(None)  # the folder exists before anyone writes into it
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_is_meant():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    own = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_"))
    records = _gather(_hash_files(tmp, own))
    if rank == 0:
        _write_durably(os.path.join(tmp, SHARDED_EXTRA), lambda f: torch.save(extra, f))
        files = {k: v for r in records for k, v in r.items()}
        files.update(_hash_files(tmp, [n for n in os.listdir(tmp) if n not in files]))
        record = {"format": STATE_FORMAT + "-dcp", "step": step, "files": files}
        _write_durably(os.path.join(tmp, SHARDED_RECORD), lambda f: f.write(json.dumps(record).encode()))
        if os.path.isdir(path):  # a checkpoint of this step that resume skipped (it failed its check)
            os.replace(path, path + ".old.tmp")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old.tmp", ignore_errors=True)
        for old in list_train_states(out_dir)[:-keep_last] if keep_last > 0 else []:
            _remove_state(old)
    _gather(None)  # nobody goes on (or resumes) before the folder is in place
    return path


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns on every save / load without a process group; at world size 1 that is the intent."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _remove_state(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
        return
    os.remove(path)
    if os.path.exists(path + ".json"):
        os.remove(path + ".json")


def check_sharded_state(path: str) -> dict:
    """Sizes of every file on every rank, SHA-256 split over the ranks; every rank gets the same verdict (a
    UnusableCheckpoint naming the file) so all of them fall back together. Returns the extra state."""
    import json

    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = ""
    try:
        with open(os.path.join(path, SHARDED_RECORD)) as f:
            files = json.load(f)["files"]
        for i, (name, want) in enumerate(sorted(files.items())):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                problem = f"{path}: {name} is missing"
            elif os.path.getsize(file) != want["bytes"]:
                problem = f"{path}: {name} has {os.path.getsize(file)} bytes, but {want['bytes']} were written"
            elif i % world == rank and _sha256(file) != want["sha256"]:
                problem = f"{path}: {name}: SHA-256 differs from the one written at save time (corrupted)"
            if problem:
                break
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{path}: unreadable {SHARDED_RECORD} ({e})"
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise UnusableCheckpoint(problems[0])
    try:
        extra = torch.load(os.path.join(path, SHARDED_EXTRA), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnusableCheckpoint(f"{path}: {SHARDED_EXTRA} not loadable ({type(e).__name__})") from e
    if not isinstance(extra, dict) or not {"scheduler", "rng", "step"} <= set(extra):
        raise UnusableCheckpoint(f"{path}: not a ville training state (keys missing)")
    return extra


def load_sharded_state(path: str, model, optimizer) -> dict:
    """Check `path`, then load its model and optimizer shards into `model` (FSDP2-sharded or not, any world size)
    and `optimizer`. Returns {"scheduler", "rng", "step"}. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    extra = check_sharded_state(path)
    model_state, optim_state = get_state_dict(model, optimizer)  # initialises empty optimizer state (lr 0 step)
    # A parameter that never had a gradient (a head whose task this stage does not train) has no optimizer state in
    # the file; it gets none here either, as in the run that wrote it (AdamW's bias correction counts its steps).
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    prefixes = {".".join(k.split(".")[2:-1]) for k in saved if k.startswith("optimizer.state.")}
    optim_state["state"] = {k: v for k, v in optim_state["state"].items() if k in prefixes}
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    for name, p in model.named_parameters():
        if name not in prefixes:
            optimizer.state.pop(p, None)
    return extra


def consolidated_state_dict(model) -> dict:
    """Collective: the full (unsharded) weights, on the CPU of rank 0 only (an empty dict on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_consolidated(model, state_dict: dict, file: str) -> None:
    """One safetensors file from a full state dict, with tied tensors stored once under the name safetensors'
    `save_model` keeps (the sorted-first), so it loads like a file written from the unsharded model."""
    from safetensors.torch import save_file

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    dropped = {n: sorted(group)[0] for group in names.values() for n in sorted(group)[1:]}
    weights = {k: v.contiguous() for k, v in state_dict.items() if k not in dropped}
    save_file(weights, file, metadata={k: v for k, v in dropped.items() if k in state_dict} or None)


def match_optimizer_shapes(optimizer) -> None:
    """Optimizer state saved while a parameter was 0-d (logit_scale, stop_motion) takes the parameter's (1,) shape."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and key != "step" and value.shape != p.shape and value.numel() == p.numel():
                    optimizer.state[p][key] = value.reshape(p.shape)
