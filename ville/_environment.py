"""What `python -m ville.train` does when the Python running it lacks ville's packages, as when a recipe is run
directly (`./recipes/tiny/stage1.yaml`, whose `#!` line names `python3`) in a shell where the environment is not
active: run again under the checkout's `.venv/bin/python` if there is one, else say in one line what to do."""
from __future__ import annotations

import importlib.util
import os
import sys

_NEEDED = ("omegaconf", "torch")  # the first third-party import and the heaviest; find_spec imports neither


def require_environment(module: str) -> None:
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(root, ".venv")
    python = os.path.join(venv, "bin", "python")
    if os.path.isfile(python) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        os.execv(python, [python, "-m", module, *sys.argv[1:]])
    sys.exit(f"error: {sys.executable} lacks ville's packages ({', '.join(missing)}); build the environment with "
             f"`make venv` in {root}, then run `source {venv}/bin/activate` or `{python} -m {module} ...`")
