"""The training loop behind `python -m ville.train` (ville/train.py parses the command line and the recipe first).

Each step draws one batch per task in `train.tasks`, computes the weighted multi-task loss (ville/losses.py) in one
forward, and takes an AdamW step. Checkpoints (model, optimizer, scheduler, RNG states, step = data position) are
written atomically every `train.save_every` steps; restarting the same command resumes from the newest complete one
and reproduces the uninterrupted loss curve. SIGTERM saves at the current step and exits cleanly. A non-finite loss
stops the run with an error naming the step; the last good checkpoint stays. The final model goes to `out_dir/final`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import Any

import torch

from . import distributed
from .checkpoint import latest_train_state, rng_state, save_train_state, set_rng_state
from .config import Recipe, to_yaml
from .data import make_train_loader
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


def train(recipe: Recipe, info: distributed.DistInfo) -> str:
    """Run (or resume) a training run. Returns the path of the final model folder."""
    cfg = recipe.train
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = ViLLE(recipe.model).to(info.device)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, cfg.max_steps)

    step = 0
    resume = latest_train_state(cfg.out_dir)
    if resume is not None:
        state = torch.load(resume, map_location=info.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
        step = state["step"]
        if info.is_main:
            print(f"resumed from {resume} at step {step}", file=sys.stderr)
    elif cfg.init_from:
        report = model.load_weights(cfg.init_from)
        if info.is_main:
            print(f"initialised from {cfg.init_from}: {report}", file=sys.stderr)
    if info.is_main:
        with open(os.path.join(cfg.out_dir, "recipe.yaml"), "w") as f:
            f.write(to_yaml(recipe))
    wrapped = distributed.wrap(model, info, cfg.parallel)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and info.device.type == "cuda")

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    for task, bs in cfg.tasks.items():
        if bs % info.world_size:
            raise ValueError(f"train.tasks.{task}: global batch {bs} is not divisible by world size {info.world_size}")
    # The stream of global batches is the same whatever the world size; each rank decodes only its rows.
    loaders = {task: make_train_loader(recipe.data, task, bs, rank=info.rank, world_size=info.world_size,
                                       start_step=step * cfg.grad_accum, seed=recipe.data.seed)
               for task, bs in cfg.tasks.items()}
    streams = {task: iter(loader) for task, loader in loaders.items()}

    def next_batches() -> dict:
        return {task: next(it) for task, it in streams.items()}

    def skipped() -> int:  # corrupt / unusable samples so far (each warned with shard + key)
        return sum(sum(loader.skips.counts.values()) for loader in loaders.values())

    def checkpoint(at: int) -> None:
        rngs = [None] * info.world_size
        if torch.distributed.is_initialized():
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if info.is_main:
            save_train_state(cfg.out_dir, at, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                               "scheduler": scheduler.state_dict(), "rng": rngs, "step": at},
                             cfg.keep_last)
        distributed.barrier()

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    logger = Logger(recipe, info, step)
    peak = _peak_tflops(info.device)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batches = next_batches()
                sync = micro == cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast():
                    loss, comps = wrapped(batches, recipe.loss)
                if step == cfg.inject_nan_at_step:
                    loss = loss * float("nan")
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=info.device)
                if float(distributed.all_reduce_mean(bad)) > 0:
                    raise NonFiniteLoss(f"non-finite loss ({float(loss)}) at step {step + 1} "
                                        f"(components: {comps}); last good checkpoint kept in {cfg.out_dir}")
                (loss / cfg.grad_accum).backward()
                for k, v in {"loss": float(loss.detach()), **comps}.items():
                    totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            if info.world_size > 1:  # log the global batch's numbers: the mean over ranks
                names = sorted(totals)
                means = distributed.all_reduce_mean(torch.tensor([totals[k] for k in names], dtype=torch.float64))
                totals = dict(zip(names, means.tolist()))
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), recipe.optim.grad_clip if recipe.optim.grad_clip > 0 else float("inf"))
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
                record = {**totals, "lr": lr, "grad_norm": float(grad_norm),
                          "skipped_samples": skipped(),
                          "samples_per_s": samples / dt, "step_time_s": dt}
                if peak:
                    record["mfu_approx"] = 6 * n_params * tokens / dt / (peak * 1e12 * info.world_size)
                logger.log(step, record)
            logger.advance()  # after log(): the bar redraws with this step's numbers, not the previous ones
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint(step)
            if stop["signal"] is not None:
                checkpoint(step)
                if info.is_main:
                    print(f"SIGTERM: saved a checkpoint at step {step}; rerun the same command to resume",
                          file=sys.stderr)
                return ""
    finally:
        logger.close()
        signal.signal(signal.SIGTERM, previous)
    final = os.path.join(cfg.out_dir, "final")
    checkpoint(step)
    if info.is_main:
        model.save_pretrained(final)
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
