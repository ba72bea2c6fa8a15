"""The training loop behind `python -m ville.train` (ville/train.py parses the command line and the recipe first).

Each step draws one batch per task in `train.tasks`, computes the weighted multi-task loss (ville/losses.py) in one
forward, and takes an AdamW step. Checkpoints (model, optimizer, scheduler, RNG states, step = data position) are
written atomically every `train.save_every` steps; restarting the same command resumes from the newest complete one
and reproduces the uninterrupted loss curve; each checkpoint carries a checksum, and resume skips (naming it) one that
fails it. A stop signal (`train.stop_signals`: SIGTERM, SIGINT, SIGUSR1), to the process group or to torchrun, makes
every rank save one checkpoint at the same step and exit 0. A non-finite loss, gradient norm, parameter or optimizer
state stops the run before it is applied or saved, naming the step and the last good checkpoint. The final model
goes to `out_dir/final`.

Under `train.parallel=fsdp` the same holds with sharded checkpoints (ville/checkpoint.py: a torch.distributed.checkpoint
folder per save, resumable at any world size) and a consolidated final model. Before the model is built,
`check_sources` checks the data, `train.init_from` and every hub source (see there). `train.contrastive_chunk`
embeds the caption / retrieval contrastive batch by gradient caching (ville/gradcache.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from . import distributed
from .checkpoint import (consolidated_state_dict, list_train_states, load_sharded_state, match_optimizer_shapes,
                         resume_train_state, rng_state, save_model, save_sharded_state, save_train_state,
                         set_rng_state, train_state_path)
from .config import Recipe, to_yaml
from .data import make_train_loader
from .losses import multitask_loss
from .model import ViLLE
from .optim import build_optimizer, build_scheduler


class NonFiniteLoss(RuntimeError):
    pass


class Logger:
    """metrics.jsonl + TensorBoard + a console progress bar, on rank 0 only."""

    def __init__(self, recipe: Recipe, info: distributed.DistInfo, start_step: int):
        self.on = info.is_main
        self.path = os.path.join(recipe.train.out_dir, "metrics.jsonl")
        self.tb = self.bar = None
        if not self.on:
            return
        if os.path.exists(self.path):  # drop entries past the checkpoint we resume from
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        if recipe.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(recipe.train.out_dir, "tb"))
        from tqdm import tqdm

        self.bar = tqdm(total=recipe.train.max_steps, initial=start_step, desc="train", mininterval=2.0,
                        dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, record: dict) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             sps=f"{record['samples_per_s']:.1f}", refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    if os.environ.get("VILLE_PEAK_TFLOPS"):
        return float(os.environ["VILLE_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)):
        if key in name:
            return peak
    return None


def _stop_signals(names: list[str]) -> list[signal.Signals]:
    out = []
    for name in names:
        sig = getattr(signal, str(name).upper(), None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"train.stop_signals: {name!r} is not a signal that can be caught (e.g. SIGTERM)")
        out.append(sig)
    return out


def _finite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Parameters and every floating optimizer state tensor are finite (no copies; one host sync for all of them)."""
    tensors = [p for p in model.parameters()] + [t for s in optimizer.state.values() for t in s.values()
                                                 if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return True
    # FSDP2: this rank's shards
    return bool(torch.stack([torch.isfinite(distributed.local(t)).all() for t in tensors]).all())


# ------------------------------------------------------------------------------------------------ fail fast
# Everything a run reads from outside is checked before the model is built (the real one takes minutes): data
# patterns, train.init_from, and each weight / tokenizer source that would come from the Hugging Face hub. A hub source
# counts as available when it is a local folder or already in the hub cache; otherwise, offline (HF_HUB_OFFLINE=1, or
# the hub unreachable within 3 s), one line names every such source with the key that replaces it.
_TRUE = {"1", "true", "yes", "on"}


def _hub_cache() -> str:
    """huggingface_hub's cache folder, from the environment as it is now (its own constant is fixed at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def _cached(repo_id: str) -> bool:
    snapshots = os.path.join(_hub_cache(), "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(snapshots) and any(os.scandir(snapshots))


def hub_reachable(timeout: float = 3.0) -> bool:
    """The hub's endpoint answers an HTTP request (any status) within `timeout` s, name lookup included (a thread
    bounds it: a machine without DNS or route answers as fast as one that refuses)."""
    import threading
    import urllib.error
    import urllib.request

    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    ok: list[bool] = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok.append(True)
        except urllib.error.HTTPError:  # an answer, even an error status, means the hub is there
            ok.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def hub_sources(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(key, hub id, what to set instead) of every source this recipe would download (local folders excluded)."""
    m = recipe.model
    out = []

    def remote(value) -> bool:
        return bool(value) and not os.path.exists(os.path.expanduser(str(value)))

    if m.init_from_vlm:
        if remote(m.init_from_vlm):
            out.append(("model.init_from_vlm", m.init_from_vlm, "model.init_from_vlm=null (separate towers) or a "
                                                                "local PaliGemma folder"))
        return out  # the checkpoint brings the tower, the LLM and (usually) the tokenizer
    if m.vision.pretrained and not m.vision.checkpoint:
        import timm

        pretrained = timm.models.get_pretrained_cfg(m.vision.name)
        hub_id = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
        if hub_id:
            out.append(("model.vision.pretrained", hub_id, "model.vision.pretrained=false (random) or "
                                                           "model.vision.checkpoint=LOCAL_FILE"))
    if m.llm.pretrained and remote(m.llm.name):
        out.append(("model.llm.name", m.llm.name, "model.llm.pretrained=false (random) or a local model.llm.name"))
    if m.llm.tokenizer != "builtin" and remote(m.llm.tokenizer):
        out.append(("model.llm.tokenizer", m.llm.tokenizer, "model.llm.tokenizer=builtin or a local folder"))
    return out


def check_sources(recipe: Recipe) -> None:
    """Raises ValueError (one line) for data, init_from or hub sources this run cannot read."""
    from .checkpoint import WEIGHTS
    from .shards import parse_sources

    parse_sources(recipe.data.train_shards, "data.train_shards")
    init = recipe.train.init_from
    if init and not os.path.isfile(os.path.join(init, WEIGHTS) if os.path.isdir(init) else init):
        raise ValueError(f"train.init_from: no weights at {init!r} (expected the previous stage's final folder, "
                         f"with {WEIGHTS}); train.init_from=null starts from the recipe's own weights")
    missing = [src for src in hub_sources(recipe) if not _cached(src[1])]
    if not missing:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in _TRUE
    if not offline and hub_reachable():
        return
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub is unreachable (run with HF_HUB_OFFLINE=1 to skip it)"
    names = "; ".join(f"{key}: {hub_id!r} -> set {fix}" for key, hub_id, fix in missing)
    if recipe.model.init_from_vlm:  # what the separate towers would need in turn, so one run names every key
        towers = replace(recipe, model=replace(recipe.model, init_from_vlm=None))
        more = [src for src in hub_sources(towers) if not _cached(src[1])]
        names += "".join(f"; then {key}: {hub_id!r} -> set {fix}" for key, hub_id, fix in more)
    raise ValueError(f"{why} and these sources are neither local nor in the hub cache ({_hub_cache()}): {names}")


def train(recipe: Recipe, info: distributed.DistInfo) -> str:
    """Run (or resume) a training run. Returns the path of the final model folder ("" when a stop signal ended it)."""
    cfg = recipe.train
    stop_signals = _stop_signals(cfg.stop_signals)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    check_sources(recipe)
    if cfg.parallel == "fsdp" and recipe.model.moment_adapter.r:
        raise ValueError("model.moment_adapter: not supported with train.parallel=fsdp (its isolated passes run the "
                         "decoder on detached copies of the parameters); use train.parallel=ddp")
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = ViLLE(recipe.model).to(info.device)
    if cfg.init_from and not list_train_states(cfg.out_dir):  # before sharding: the file holds full tensors
        report = model.load_weights(cfg.init_from)
        if info.is_main:
            print(f"initialised from {cfg.init_from}: {report}", file=sys.stderr)
    # Sharding replaces the parameters (FSDP2), so the optimizer is built on the wrapped model's; a sharded run
    # writes torch.distributed.checkpoint folders (any world size reads them), the others one file from rank 0.
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and info.device.type == "cuda")
    wrapped = distributed.wrap(model, info, cfg.parallel, bf16=amp)
    sharded_format = cfg.parallel == "fsdp"
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, cfg.max_steps)

    step = 0
    resume, state, problems = resume_train_state(cfg.out_dir, map_location=info.device,
                                                 load_sharded=lambda p: load_sharded_state(p, model, optimizer))
    if info.is_main:
        for problem in problems:
            print(f"warning: skipped checkpoint {problem}; resuming from an older one", file=sys.stderr)
    if state is not None:
        if "model" in state:  # a single-file checkpoint (a sharded one is already in the model and optimizer)
            if distributed.is_sharded(model):
                raise ValueError(f"{resume}: written by an unsharded run (train.parallel=ddp); resume it with "
                                 f"train.parallel=ddp")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        match_optimizer_shapes(optimizer)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
        step = state["step"]
        del state
        if info.is_main:
            print(f"resumed from {resume} at step {step}", file=sys.stderr)
    if info.is_main:
        with open(os.path.join(cfg.out_dir, "recipe.yaml"), "w") as f:
            f.write(to_yaml(recipe))

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    if cfg.contrastive_chunk < 0:
        raise ValueError(f"train.contrastive_chunk: expected 0 (off) or a chunk size >= 1, got {cfg.contrastive_chunk}")
    if cfg.contrastive_chunk > 0 and recipe.loss.swap > 0:
        raise ValueError("train.contrastive_chunk: loss.swap (swapped-word negatives) is not supported with gradient "
                         "caching; set loss.swap=0 or train.contrastive_chunk=0")
    for task, bs in cfg.tasks.items():
        if bs % info.world_size:
            raise ValueError(f"train.tasks.{task}: global batch {bs} is not divisible by world size {info.world_size}")
    # A signal only sets a flag; the loop acts on it between steps, once every rank has seen it (see below). The
    # handlers go in before the DataLoader workers start, and the workers ignore these signals (ville/data.py).
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in stop_signals}
    # The stream of global batches is the same whatever the world size; each rank decodes only its rows.
    loaders = {task: make_train_loader(recipe.data, task, bs, rank=info.rank, world_size=info.world_size,
                                       start_step=step * cfg.grad_accum, seed=recipe.data.seed)
               for task, bs in cfg.tasks.items()}
    streams = {task: iter(loader) for task, loader in loaders.items()}

    def next_batches() -> dict:
        return {task: next(it) for task, it in streams.items()}

    def skipped() -> dict:  # corrupt / unusable samples so far (each warned with shard + key)
        return {"skipped_samples": sum(loader.skips.distinct for loader in loaders.values()),
                "skip_encounters": sum(loader.skips.total for loader in loaders.values())}

    last_good = [resume]

    def nonfinite(what: str, at: int) -> NonFiniteLoss:
        good = last_good[0] or "none (no checkpoint was saved before it)"
        return NonFiniteLoss(f"{what} at step {at}; stopped without saving it. Last good checkpoint: {good} "
                             f"(resuming it with the same recipe repeats this step: lower optim.lr or check the data)")

    def checkpoint(at: int) -> None:
        # Every rank checks its own copy (DDP keeps them equal; FSDP shards them) and all agree before anyone saves.
        bad = torch.tensor(0.0 if _finite_state(model, optimizer) else 1.0, device=info.device)
        if float(distributed.all_reduce_max(bad)) > 0:
            raise nonfinite("non-finite parameters or optimizer state", at)
        rngs = [None] * info.world_size
        if torch.distributed.is_initialized():
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if sharded_format:
            last_good[0] = save_sharded_state(cfg.out_dir, at, model, optimizer,
                                              {"scheduler": scheduler.state_dict(), "rng": rngs, "step": at},
                                              cfg.keep_last)
        elif info.is_main:
            last_good[0] = save_train_state(
                cfg.out_dir, at, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "rng": rngs, "step": at}, cfg.keep_last)
        else:
            last_good[0] = train_state_path(cfg.out_dir, at)
        distributed.barrier()

    logger = Logger(recipe, info, step)
    peak = _peak_tflops(info.device)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped.train()
    stop = False
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batches = next_batches()
                sync = micro == cfg.grad_accum - 1
                if cfg.contrastive_chunk > 0:  # past DDP's wrapper, FSDP2's root hooks kept (ville/distributed.py)
                    with autocast():
                        loss, comps = distributed.forward_with_backward(model, lambda: multitask_loss(
                            model, batches, recipe.loss, cfg.contrastive_chunk, 1.0 / cfg.grad_accum))
                else:
                    with distributed.gradient_sync(wrapped, sync), autocast():
                        loss, comps = wrapped(batches, recipe.loss)
                if step == cfg.inject_nan_at_step:
                    loss = loss * float("nan")
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=info.device)
                if float(distributed.all_reduce_max(bad)) > 0:
                    raise nonfinite(f"non-finite loss ({float(loss.detach())}; components: {comps})", step + 1)
                if loss.requires_grad:  # not when gradient caching computed every term already
                    (loss / cfg.grad_accum).backward()
                for k, v in {"loss": float(loss.detach()), **comps}.items():
                    totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            if cfg.contrastive_chunk > 0 and info.world_size > 1:
                distributed.reduce_cached_grads(model)  # DDP: what its hooks do, once per step; FSDP2: done
            if info.world_size > 1:  # log the global batch's numbers: the mean over ranks
                names = sorted(totals)
                means = distributed.all_reduce_mean(torch.tensor([totals[k] for k in names], dtype=torch.float64))
                totals = dict(zip(names, means.tolist()))
            grad_norm = distributed.clip_grad_norm(
                model.parameters(), recipe.optim.grad_clip if recipe.optim.grad_clip > 0 else float("inf"))
            # One collective answers both questions, so every rank takes the same decision at the same step: a
            # signal seen by any rank stops all of them after this step; a non-finite gradient stops them before it.
            flags = distributed.all_reduce_max(torch.tensor(
                [1.0 if received else 0.0, 0.0 if torch.isfinite(grad_norm) else 1.0], device=info.device))
            stop, bad_grad = (bool(x) for x in flags.tolist())
            if bad_grad:
                raise nonfinite(f"non-finite gradient norm ({float(grad_norm)})", step + 1)
            lr = scheduler.get_last_lr()[0]  # the rate this step applies (read before the schedule advances)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # temperature stays in [1, max_logit_scale]
                model.logit_scale.clamp_(0.0, math.log(recipe.model.embed.max_logit_scale))
            step += 1
            dt = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1:
                samples = totals.pop("samples") * cfg.grad_accum * info.world_size
                tokens = totals.pop("video_tokens") * cfg.grad_accum * info.world_size
                record = {**totals, "lr": lr, "grad_norm": float(grad_norm), **skipped(),
                          "samples_per_s": samples / dt, "step_time_s": dt}
                if peak:
                    record["mfu_approx"] = 6 * n_params * tokens / dt / (peak * 1e12 * info.world_size)
                logger.log(step, record)
            logger.advance()  # after log(): the bar redraws with this step's numbers, not the previous ones
            if stop:
                checkpoint(step)
                break
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint(step)
    finally:
        for it in streams.values():  # shuts the DataLoader workers down (they ignore the stop signals)
            it.close()
        logger.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:  # after the progress bar is closed, so the line stands alone
        if info.is_main:
            names = "/".join(sorted({signal.Signals(s).name for s in received})) or "a signal on another rank"
            print(f"{names}: saved a checkpoint at step {step} ({last_good[0]}); rerun the same command to resume",
                  file=sys.stderr)
        return ""
    final = os.path.join(cfg.out_dir, "final")
    checkpoint(step)
    sharded = distributed.is_sharded(model)
    weights = consolidated_state_dict(model) if sharded else None  # collective; the full weights on rank 0's CPU
    if info.is_main:
        save_model(model, final, state_dict=weights)
        del weights
        if recipe.model.llm.lora.enabled and cfg.init_from:  # the shareable part of a LoRA stage (ville/merge.py)
            # a sharded model's adapter comes from the consolidated folder just written
            (ViLLE.from_pretrained(final) if sharded else model).save_adapter(
                os.path.join(cfg.out_dir, "adapter"), base=cfg.init_from)
        with open(os.path.join(final, "recipe.yaml"), "w") as f:
            f.write(to_yaml(recipe))
    distributed.barrier()
    return final


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Build the model on the meta device (no memory, no weights) and the optimizer: checks a recipe end to end."""
    with torch.device("meta"):
        model = ViLLE(recipe.model)
        build_optimizer(model, recipe.optim)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "tasks": dict(recipe.train.tasks),
            "video_tokens_per_clip": model.vision.tokens_per_frame * recipe.data.num_frames}
