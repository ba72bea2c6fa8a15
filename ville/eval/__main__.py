"""Command line: `python -m ville.eval MODEL_DIR --data DIR ...` or `torchrun ... -m ville.eval ...`, one flag per
`EvalCfg` field. Arguments are parsed before torch and the model code are imported, so `--help` and usage errors are
instant.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

from . import __doc__ as PACKAGE_DOC
from .config import TASKS, EvalCfg


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m ville.eval", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("model", help="model folder written by save_pretrained")
    p.add_argument("--data", required=True, help="dataset folder (DIR/<split>/shard-*.tar)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    for f in fields(EvalCfg):
        if "help" in f.metadata:
            flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split(" |")[0]
            if kind == "bool":
                p.add_argument(flag, action="store_true", help=f.metadata["help"])
            else:
                p.add_argument(flag, type={"int": int, "float": float, "str": str, "tuple": float}[kind],
                               nargs="+" if kind == "tuple" else None, default=f.default, help=f.metadata["help"])
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    a = vars(p.parse_args(argv))
    import torch.distributed as dist  # only now: --help and usage errors do not wait for torch

    from ..checkpoint import model_identity
    from ..distributed import setup, teardown
    from ..model import ViLLE
    from .common import rank_world
    from .runner import evaluate, format_table

    owned = not dist.is_initialized()  # a caller's process group is left alone
    info = setup()  # torchrun: process group (nccl on CUDA, gloo on CPU); otherwise a single process
    device = a.pop("device") or str(info.device)
    model_dir, data = a.pop("model"), a.pop("data")
    name = os.path.basename(os.path.normpath(model_dir))
    a["out"] = a["out"] or os.path.join("eval_out", f"{name}-{a['split']}.json")
    a["moment_scales"], a["progress"] = tuple(a["moment_scales"]), not a.pop("no_progress")
    if rank_world()[0] == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a["out"])), exist_ok=True)
    try:
        model = ViLLE.from_pretrained(model_dir, map_location=device)
        results = evaluate(model, data, identity=model_identity(model_dir), model_dir=model_dir, **a)
        if results is not None:
            print(format_table(results))
            print(f"\nresults: {a['out']}")
        return results
    finally:
        if owned:
            teardown()


if __name__ == "__main__":
    main()
