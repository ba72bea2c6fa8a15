"""What a user runs from a checkout's root works there: no top-level folder of the repository hides a package that
ville's dependency tree installs, and the entry points start.

`python -m ...`, `python -c ...` and `python -m pytest` put the current folder first on sys.path, so a top-level
folder with an `__init__.py` wins over an installed package of the same name. That broke every command once: our
`kernels/` hid Hugging Face's `kernels`, which transformers imports. These tests run Python in a subprocess from the
repository root, as a user does.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _top_level_names() -> list[str]:
    """Every name the repository root offers to `import`: folders (package or not) and .py files."""
    names = []
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.startswith(".") or entry.startswith("_"):
            continue
        if os.path.isdir(path) and entry.isidentifier():
            names.append(entry)
        elif entry.endswith(".py") and entry[:-3].isidentifier():
            names.append(entry[:-3])
    return names


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# transformers requires HF's kernels from some 5.x release on (uv.lock has it); older ones (make lowest) do not.
needs_hf_kernels = pytest.mark.skipif(not _hf_kernels_installed(), reason="HF's kernels is not installed here")


def test_no_top_level_folder_shadows_an_installed_package():
    owners = importlib.metadata.packages_distributions()
    foreign = {n: owners[n] for n in _top_level_names() if n in owners and set(owners[n]) != {"ville"}}
    assert ("kernels" in foreign) == _hf_kernels_installed()
    if not foreign:
        return
    code = "import importlib, sys\nfor n in sys.argv[1:]: print(n, importlib.import_module(n).__file__)"
    out = _run_from_root("-c", code, *sorted(foreign))
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        name, origin = line.split(" ", 1)
        mine = (os.path.join(ROOT, name) + os.sep, os.path.join(ROOT, name + ".py"))
        assert not os.path.realpath(origin).startswith(mine), \
            f"the repository's top-level {name!r} hides the installed package of {foreign[name]}: {origin}"


def test_our_top_level_packages_are_only_ours():
    """The folders that are packages (ville, data_tools) are names no other installed distribution uses."""
    owners = importlib.metadata.packages_distributions()
    ours = [n for n in _top_level_names() if os.path.isfile(os.path.join(ROOT, n, "__init__.py"))]
    assert "ville" in ours and "kernels" not in ours
    assert all(set(owners.get(n, ["ville"])) == {"ville"} for n in ours), {n: owners.get(n) for n in ours}


@needs_hf_kernels
def test_transformers_hub_kernels_and_the_model_import_from_the_root():
    code = ("import transformers.integrations.hub_kernels, kernels, ville_kernels\n"
            "from ville.model import ViLLE\n"
            "print(kernels.__file__, ville_kernels.__file__)")
    out = _run_from_root("-c", code)
    assert out.returncode == 0, out.stderr
    hf_kernels, ours = out.stdout.split()
    assert "site-packages" in hf_kernels and os.path.join("kernels", "ville_kernels") in ours


def test_train_help_runs_from_the_root():
    out = _run_from_root("-m", "ville.train", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: python -m ville.train" in out.stdout
