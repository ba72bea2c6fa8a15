"""Benchmark: gathered (multi-rank) symmetric InfoNCE, the 4-pass layout against the two-call layout.

Providers, on W gloo processes (CPU, one intra-op thread each, rank r holding T / W pairs):
    4pass        ville.contrastive.gathered_infonce: one forward and one backward tile (n_r x T) per rank, the
                 columns' log-sum-exp statistics all-reduced; chunked PyTorch kernels (the only CPU path that returns
                 every column's statistics)
    2call-torch  ville.contrastive._gathered_infonce_two_calls: q and p gathered with gradient, one one-directional
                 fused_infonce per direction (2 forward + 2 backward tiles), chunked PyTorch kernels
    2call-csrc   the same on the native CPU kernels (fused_infonce's CPU default when ville_kernels._C is built)

Each measurement is forward + backward of the loss through a barrier-to-barrier wall time, the slowest rank's, the
median over --repeats after --warmup runs. Bytes are the collective payloads one rank sends per step, counted by
wrapping torch.distributed.all_gather / all_reduce (all-gather: the local buffer; all-reduce: the whole tensor).

Usage
    python bench/bench_infonce_dist.py                                   # W=2, T in {2k, 4k, 8k}, D=256
    python bench/bench_infonce_dist.py --world 3 --sizes 3k --dim 128 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ville.contrastive import _gathered_infonce_two_calls, gathered_infonce  # noqa: E402
from ville_kernels import native  # noqa: E402

import bench_infonce  # noqa: E402  (bench/ is sys.path[0] when run as a script)

PROVIDERS = {"4pass": (gathered_infonce, "torch"), "2call-torch": (_gathered_infonce_two_calls, "torch"),
             "2call-csrc": (_gathered_infonce_two_calls, "")}


class _CountBytes:
    """Wraps dist.all_gather / all_reduce, counting the bytes this rank contributes."""

    def __init__(self):
        self.gather = self.reduce = 0
        self._all_gather, self._all_reduce = dist.all_gather, dist.all_reduce

    def __enter__(self):
        def all_gather(outputs, tensor, *args, **kw):
            self.gather += tensor.numel() * tensor.element_size()
            return self._all_gather(outputs, tensor, *args, **kw)

        def all_reduce(tensor, *args, **kw):
            self.reduce += tensor.numel() * tensor.element_size()
            return self._all_reduce(tensor, *args, **kw)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self._all_gather, self._all_reduce


def _step(loss_fn, q_leaf, p_leaf, scale):
    loss = loss_fn(q_leaf, p_leaf, scale)
    loss.backward()
    return loss


def _worker(rank, world, port, sizes, dim, repeats, warmup, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for total in sizes:
            n = total // world + (1 if rank < total % world else 0)
            gen = torch.Generator().manual_seed(1000 * rank + total)
            q = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
            p = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
            scale = torch.tensor(14.3, requires_grad=True)
            for name, (loss_fn, kernels) in PROVIDERS.items():
                if name == "2call-csrc" and not native.LOADED:
                    continue
                os.environ["VILLE_KERNELS"] = kernels  # read by ville_kernels.dispatch at each call
                times = []
                for i in range(warmup + repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    with _CountBytes() as counted:
                        loss = _step(loss_fn, q, p, scale)
                    dist.barrier()
                    elapsed = torch.tensor([time.perf_counter() - start])
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if i >= warmup:
                        times.append(elapsed.item() * 1e3)
                    q.grad = p.grad = scale.grad = None
                if rank == 0:
                    queue.put(dict(T=total, D=dim, provider=name, ms=statistics.median(times),
                                   spread=(min(times), max(times)), gather=counted.gather, reduce=counted.reduce,
                                   loss=loss.item()))
    finally:
        dist.destroy_process_group()


def _parse_size(text: str) -> int:
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _header(world: int) -> str:
    """bench_infonce's header line (device, torch, triton, commit, time) plus the ranks and the csrc state."""
    return (f"{bench_infonce.header(torch.device('cpu'))} | {world} gloo ranks x 1 thread | "
            f"csrc {'loaded' if native.LOADED else 'absent'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--sizes", default="2k,4k,8k", help="global batch sizes T, comma separated (k = 1024)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_worker, args=(args.world, port, sizes, args.dim, args.repeats, args.warmup, queue),
                       nprocs=args.world, join=True, start_method="fork")
    print(_header(args.world))
    print(f"{'T':>6} {'D':>5} {'provider':<12} {'fwd+bwd ms':>11} {'(min..max)':>17} {'gathered MB':>12} "
          f"{'all-reduced MB':>15} {'loss':>9}")
    while not queue.empty():
        r = queue.get()
        print(f"{r['T']:>6} {r['D']:>5} {r['provider']:<12} {r['ms']:>11.1f} "
              f"{r['spread'][0]:>8.1f}..{r['spread'][1]:<8.1f} {r['gather'] / 1e6:>12.3f} {r['reduce'] / 1e6:>15.3f} "
              f"{r['loss']:>9.5f}")


if __name__ == "__main__":
    main()
