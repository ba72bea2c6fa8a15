"""Training: `python -m ville.train RECIPE.yaml [dotted.key=value ...]`, the same under
`torchrun --nproc-per-node N -m ville.train RECIPE.yaml ...` (one process without WORLD_SIZE; nccl on CUDA, gloo on
CPU). Recipes are executable (`./recipes/tiny/stage1.yaml`, `torchrun --no-python recipes/stage3.yaml`).

This entry reads the command line and checks the recipe before importing torch, so `--help` and a recipe error
answer at once; the loop itself is ville/trainer.py.
"""
from __future__ import annotations

import argparse
import json
import sys

if __name__ == "__main__":  # before the third-party imports: a recipe run with a Python that lacks ville's packages
    from ._environment import require_environment

    require_environment("ville.train")

from .config import load_recipe

__all__ = ["load_recipe", "main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ville.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.max_steps=10")
    ap.add_argument("--dry-run", action="store_true", help="build model + optimizer on the meta device and exit")
    ap.add_argument("--estimate-memory", type=int, nargs="?", const=8, metavar="GPUS",
                    help="print the per-GPU peak memory of one training step and of embedding at the recipe's "
                         "batch sizes, traced on fake tensors (ville/memory.py), split over GPUS ranks (default 8)")
    args = ap.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.estimate_memory is not None:
        from . import memory

        return memory.main([args.recipe, *args.overrides, "--gpus", str(args.estimate_memory)])
    from . import distributed
    from .trainer import NonFiniteLoss, dry_run, train

    if args.dry_run:
        print(json.dumps(dry_run(recipe), indent=1))
        return 0
    info = distributed.setup()
    try:
        final = train(recipe, info)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # bad data paths, batch sizes, ... found while setting up
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    if final and info.is_main:
        print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
