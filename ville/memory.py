"""Per-GPU peak memory of a recipe, from tracing one step on fake tensors (no weights, no data, no GPU).

    python -m ville.memory RECIPE [key=value ...] [--gpus 8] [--text-tokens 32]

The model is built under `FakeTensorMode` (every tensor has a shape, a dtype and a storage size, but no data) and one
training step runs on it exactly as the trainer runs it: forward of one synthetic batch per task at the recipe's
per-GPU batch sizes under bf16 autocast (the trainer's CUDA default), backward, and the AdamW step of
`ville.optim.build_optimizer`. A dispatch mode (`_Live`) counts the bytes of every storage the step creates until
it is freed and reports the peak over the step, with the parameters', gradients' and optimizer state's bytes (torch's
`MemTracker` refuses modules called more than once per step, as the embedding table is here). Embedding /
evaluation memory is traced the same way: tower + the embedding decode's prefill with its KV cache and every decode
step of a fixed-length embedding, at the largest per-GPU batch of the recipe.

What is not traced, and how it is accounted for (printed beside the table):
- the device is the CPU (fake CUDA tensors cannot run backward without a GPU): CPU autocast stands in for CUDA's;
- attention is traced with the `chunked` path (ville/attention.py): it holds one block of fp32 scores at a time,
  an upper bound of the fused FlexAttention kernel the GPU runs;
- FSDP: parameters, gradients and optimizer state are sharded over `--gpus` ranks (their traced bytes / N), plus one
  unsharded copy of the largest parameter (FSDP2 all-gathers one layer at a time); activations are per rank. The
  training verdict reads this figure for `train.parallel=fsdp` and the one-replica peak for `ddp`;
- `train.contrastive_chunk`: the step is traced through gradient caching as the trainer runs it (ville/gradcache.py:
  every chunk embedded without a graph, the loss backward on the cached embeddings, each chunk re-run with a graph
  and back-propagated), so the peak holds one chunk's tower activations, not the batch's;
- the CUDA caching allocator's fragmentation and the CUDA context (~0.5-1 GB) come on top; the verdict asks for
  10 % headroom below 80 GB.
Weights are random (`pretrained=false`, `init_from_vlm=null`, built-in tokenizer); the embedding table and LM head
keep the recipe's `llm.config.vocab_size`, so logits are sized as with the real tokenizer.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace

GB = 1e9
_PROMPT = "Describe the video."


def _recipe_for_tracing(recipe):
    m = recipe.model
    llm = replace(m.llm, pretrained=False, tokenizer="builtin", attention="chunked")
    vision = replace(m.vision, pretrained=False, checkpoint=None)
    # decode steps through the reference op: the kernel's input checks read values (a decode step's memory is its
    # KV cache, traced in the prefill, and one row of scores either way)
    return replace(recipe, model=replace(m, init_from_vlm=None, llm=llm, vision=vision, decode_attention="ref"))


def _batch(task: str, n: int, frames, text_tokens: int, num_windows: int):
    import torch

    words = [list(range(10, 10 + text_tokens))] * n  # token ids below the built-in vocabulary
    if task in ("caption", "detailed_caption", "qa"):
        return {"frames": frames, "prompt": [_PROMPT] * n, "target": words, "keys": [f"k{i}" for i in range(n)]}
    if task == "retrieval":
        return {"frames": frames, "text": words, "group": torch.arange(n)}
    if task == "localisation":
        return {"frames": frames[:, None].expand(-1, num_windows, *frames.shape[1:]), "text": words,
                "window_mask": torch.ones(n, num_windows, dtype=torch.bool)}
    if task == "matching":
        return {"frames": frames, "text": words, "label": torch.ones(n)}
    if task == "composed":
        return {"frames": frames, "edit": words, "text": words}
    raise ValueError(f"train.tasks: unknown task {task!r}")


def _frames(model, n: int, num_frames: int):
    import torch

    H, W = model.vision.input_size
    return torch.zeros(n, num_frames, H, W, 3, dtype=torch.uint8)


class _Live:
    """Bytes of every tensor storage alive, and their peak: each op's outputs are counted once per storage (views
    and in-place results share one) until the storage is freed (weakref callback). Built on first use so that
    importing this module does not import torch."""

    def __new__(cls, base: int, fake: bool = True):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Live(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.now = self.peak = base
                self.refs: dict[int, weakref.ref] = {}

            def _free(self, key, nbytes):
                self.refs.pop(key, None)
                self.now -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                if fake and func is torch.ops.aten._local_scalar_dense.default:
                    # A value read on the host (loss logging, stop tests): fake tensors have none; any number
                    # serves (1: AdamW divides by its bias correction), the memory of the step does not depend on it.
                    return 1.0 if args[0].is_floating_point() else 1
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st._cdata
                        if key not in self.refs:
                            n = st.nbytes()
                            self.refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._free(k, n))
                            self.now += n
                self.peak = max(self.peak, self.now)
                return out

        return Live()


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def trace(recipe, gpus: int = 1, text_tokens: int = 32, fake: bool = True, amp: bool = True,
          embed: bool = True) -> dict:
    """-> {"train": peak bytes by category, "embed": ..., "fsdp_train": bytes, "largest_param": bytes,
    "train_batch": {task: per-GPU batch}, "embed_batch": int}. `fake=False` runs the same step on real CPU tensors
    (the check against a measured peak); `amp=False` traces without bf16 autocast; `embed=False` skips the embedding
    trace."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .losses import multitask_loss
    from .model import ViLLE, _DecodeSession
    from .optim import build_optimizer

    recipe = _recipe_for_tracing(recipe)
    per_gpu = {t: max(1, b // gpus) for t, b in recipe.train.tasks.items()}
    torch.manual_seed(0)
    # Built on the meta device (initialisers read values, e.g. timm's truncated normal), then given fake storage.
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = ViLLE(recipe.model)
        vocab = recipe.model.llm.config.get("vocab_size")
        if vocab and vocab > model.base_llm().get_input_embeddings().num_embeddings:
            model.base_llm().resize_token_embeddings(vocab, mean_resizing=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    result = {"train_batch": per_gpu, "gpus": gpus, "parallel": recipe.train.parallel,
              "contrastive_chunk": recipe.train.contrastive_chunk}
    with mode:
        if fake:
            model.to_empty(device="cpu")
        optimizer = build_optimizer(model, recipe.optim)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        batches = {t: _batch(t, n, _frames(model, n, recipe.data.num_frames), text_tokens,
                             recipe.data.num_window_negatives + 1) for t, n in per_gpu.items()}
        model.train()
        params = _bytes(list(model.parameters()) + list(model.buffers()))
        live = _Live(params, fake)
        with live:
            with autocast:  # with train.contrastive_chunk, gradient caching runs its backward passes in here
                loss, _ = multitask_loss(model, batches, recipe.loss, recipe.train.contrastive_chunk,
                                         1.0 / recipe.train.grad_accum)
            if loss.requires_grad:
                (loss / recipe.train.grad_accum).backward()
            grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
            optimizer.step()
            opt = _bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
            optimizer.zero_grad(set_to_none=True)
        result["train"] = {"params": params, "grads": grads, "optimizer": opt, "peak": live.peak}
        result["largest_param"] = max(p.numel() * p.element_size() for p in model.parameters())
        del loss, batches
        if not embed:
            return result

        n = max(per_gpu.values())
        model.eval()
        K = recipe.model.embed.max_embed_tokens
        live = _Live(params, fake)
        with live, torch.no_grad():  # no autocast: inference runs in the weights' dtype, as ville.eval does
            # embed_video's prefill and K decode steps with no sample stopping early (its stop test reads values,
            # which fake tensors do not have)
            tokens, _ = model.encode_video(_frames(model, n, recipe.data.num_frames))
            prefixes = model._video_prefixes(None, model._video_prompt_ids(n), tokens)
            embeds, plens, lens = model._pack(prefixes)
            sess = _DecodeSession(model, embeds, plens, lens, K)
            query = model.emb_query.to(model._llm_dtype)[None].expand(n, -1)
            states = [sess.step(query) for _ in range(K)]
            model.head(torch.stack(states, 1), torch.full((n,), K, dtype=torch.long))
        result["embed"] = {"params": params, "peak": live.peak}
        result["embed_batch"] = n
    t = result["train"]
    sharded = t["params"] + t["grads"] + t["optimizer"]
    result["fsdp_train"] = t["peak"] - sharded + sharded / gpus + result["largest_param"]
    result["fsdp_embed"] = result["embed"]["peak"] - params + params / gpus + result["largest_param"]
    return result


def table(path: str, result: dict, budget_gb: float = 80.0) -> str:
    t, e = result["train"], result["embed"]
    chunk = result["contrastive_chunk"]
    cached = f", contrastive towers {chunk} at a time (gradient caching)" if chunk else ""
    rows = [f"{path}: per-GPU peak memory at {result['gpus']} GPUs (FakeTensor trace of one step; ville/memory.py)",
            f"  train  batch/GPU {result['train_batch']}{cached}: traced peak {t['peak'] / GB:.2f} GB on one replica "
            f"(params {t['params'] / GB:.2f}, grads {t['grads'] / GB:.2f}, optimizer {t['optimizer'] / GB:.2f}); "
            f"FSDP per GPU {result['fsdp_train'] / GB:.2f} GB",
            f"  embed  batch/GPU {result['embed_batch']}: traced peak {e['peak'] / GB:.2f} GB on one replica; "
            f"FSDP per GPU {result['fsdp_embed'] / GB:.2f} GB"]
    # a DDP run trains with a whole replica (parameters, gradients, AdamW state) on every GPU
    sharded = result["parallel"] == "fsdp"
    worst = max(result["fsdp_train"] if sharded else t["peak"], result["fsdp_embed"]) / GB
    verdict = "fits" if worst <= 0.9 * budget_gb else "does NOT fit"
    rows.append(f"  {verdict} {budget_gb:.0f} GB with 10 % headroom (worst {worst:.1f} GB, "
                f"train.parallel={result['parallel']})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from .config import load_recipe

    p = argparse.ArgumentParser(prog="python -m ville.memory", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    p.add_argument("--gpus", type=int, default=8, help="ranks the global batches are split over (default 8)")
    p.add_argument("--text-tokens", type=int, default=32, help="tokens per caption / text in the traced batch")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.gpus < 1:
            raise ValueError(f"--gpus: must be >= 1, got {args.gpus}")
        result = trace(copy.deepcopy(recipe), args.gpus, args.text_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(args.recipe, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
