"""`make gpu-check`: on a machine with an NVIDIA GPU, the CUDA tests of both kernels and the benchmarks at their
headline sizes, with the results appended to bench/RESULTS.md (device, date, commit). Budget: under 8 minutes on
an H100.

Runs with a plain `python3` on an image where nothing can be installed (torch, triton, transformers, timm, peft; no
PyAV, webdataset or pytest needed): the checkout's `kernels/` and root go on PYTHONPATH (no `make venv`, no build of
the CPU extension), the CUDA tests run through pytest when it is importable and otherwise through this script's own
minimal runner over the same test functions, and a step that fails or runs past its time limit is recorded as such
while the remaining steps still run. Exit status 1 when any step failed.

    python3 bench/gpu_check.py                  # the real run (needs CUDA)
    python3 bench/gpu_check.py --dry-run        # no GPU: the same steps at CPU-sized arguments, results to --out
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")

def _pytest_available() -> bool:
    return importlib.util.find_spec("pytest") is not None and not os.environ.get("GPU_CHECK_NO_PYTEST")


def _env() -> dict:
    env = dict(os.environ)
    paths = [os.path.join(REPO, "kernels"), REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("TRITON_INTERPRET", None)
    env.pop("VILLE_KERNELS", None)
    env["VILLE_NO_EXT"] = "1"  # the CPU extension is not built on the GPU image; say so instead of failing to load
    return env


# A runner for the CUDA test cases without pytest: the test modules import pytest only for decorators and a few
# helpers, which a stand-in module provides (marks are recorded as `pytestmark` like pytest's, so the case lists are
# the modules' own); the monkeypatch fixture becomes direct environment and attribute changes, undone after each case.
_MINI_RUNNER = r'''
import contextlib, importlib, os, sys, traceback, types
sys.path.insert(0, os.path.join(sys.argv[1], "tests", "kernels"))

class Skipped(Exception):
    pass

def _mark(name):
    def factory(*args, **kwargs):
        def deco(fn):
            fn.__dict__.setdefault("pytestmark", []).append(types.SimpleNamespace(name=name, args=args, kwargs=kwargs))
            return fn
        return deco
    return factory

@contextlib.contextmanager
def _raises(exc, match=None):
    try:
        yield
    except exc:
        return
    raise AssertionError(f"did not raise {exc}")

def _skip(reason=""):
    raise Skipped(reason)

def _fail(msg=""):
    raise AssertionError(msg)

def _fixture(*args, **kwargs):
    return args[0] if args and callable(args[0]) and not kwargs else (lambda fn: fn)

stub = types.ModuleType("pytest")
stub.mark = types.SimpleNamespace(parametrize=_mark("parametrize"), skipif=_mark("skipif"), timeout=_mark("timeout"))
stub.fixture, stub.importorskip, stub.raises, stub.skip, stub.fail = (_fixture, importlib.import_module, _raises,
                                                                      _skip, _fail)
sys.modules["pytest"] = stub
import torch
import test_infonce as ti
import test_infonce_gemm_bwd as tg
import test_decode_attention as td

class Patch:
    def __init__(self): self.undo = []
    def setenv(self, k, v): self.undo.append(("env", k, os.environ.get(k))); os.environ[k] = v
    def delenv(self, k, raising=False): self.undo.append(("env", k, os.environ.get(k))); os.environ.pop(k, None)
    def setattr(self, obj, name, value):
        self.undo.append(("attr", (obj, name), getattr(obj, name)))
        setattr(obj, name, value)
    def close(self):
        for kind, key, old in reversed(self.undo):
            if kind == "env":
                os.environ.pop(key, None) if old is None else os.environ.__setitem__(key, old)
            else:
                setattr(key[0], key[1], old)

cases = [("infonce " + c.id, lambda p, c=c: ti.test_triton_cuda(c, p)) for c in ti.CUDA_CASES]
cases += [("infonce gemm backward " + c.id, lambda p, c=c: tg.test_gemm_provider_cuda(c, p)) for c in tg.CUDA_CASES]
decode = [m for m in td.test_cuda.pytestmark if m.name == "parametrize"]
values = {m.args[0]: m.args[1] for m in decode}
for c in values["c"]:
    for path in values["path"]:
        cases.append((f"decode {td.case_id(c)} {path}", lambda p, c=c, path=path: td.test_cuda(p, c, path)))
if not torch.cuda.is_available():  # the dry run: the case list is what it can check
    print("\n".join(f"no CUDA, not run: {name}" for name, _ in cases))
    print(f"{len(cases)} cases collected")
    sys.exit(0)
failed = 0
for name, fn in cases:
    patch = Patch()
    try:
        fn(patch)
        print("PASSED", name, flush=True)
    except Skipped as e:
        print("SKIPPED", name, e, flush=True)
    except Exception:
        failed += 1
        print("FAILED", name, traceback.format_exc(limit=3), flush=True)
    finally:
        patch.close()
print(f"{len(cases) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
'''


def steps(dry_run: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, time limit s). Dry run: the same commands at CPU-sized arguments. The real limits sum to 480 s,
    the 8-minute budget."""
    py = sys.executable
    tests = ["tests/kernels/test_infonce.py::test_triton_cuda", "tests/kernels/test_decode_attention.py::test_cuda",
             "tests/kernels/test_infonce_gemm_bwd.py::test_gemm_provider_cuda",
             "tests/kernels/test_infonce_fp16_backward.py", "tests/kernels/test_infonce_grid.py"]
    if _pytest_available():
        test_cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    else:
        test_cmd = [py, "-c", _MINI_RUNNER, REPO]
    if dry_run:
        return [("CUDA tests", test_cmd, 120),
                ("bench_infonce", [py, "bench/bench_infonce.py", "--sizes", "1k", "--dims", "64", "--quick",
                                   "--providers", "naive,chunked,triton_atomic,triton_gemm"], 120),
                ("bench_decode_attention", [py, "bench/bench_decode_attention.py", "--quick"], 300)]
    return [("CUDA tests", test_cmd, 150),
            # issue 3's headline: N = M = 64k, D = 1024, bf16 (and 16k for the trend); both Triton backwards
            # (triton_atomic, triton_gemm) side by side, so this run picks VILLE_INFONCE_BWD's default
            ("bench_infonce", [py, "bench/bench_infonce.py", "--sizes", "16k,64k", "--dims", "1024",
                               "--providers", "naive,chunked,triton_atomic,triton_gemm,inf_cl"], 150),
            ("bench_decode_attention", [py, "bench/bench_decode_attention.py"], 90),
            ("bench_decode", [py, "bench/bench_decode.py", "--quick", "--repeats", "2"], 90)]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown (no git)"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    return f"no CUDA device ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"


def run(dry_run: bool, out_path: str) -> int:
    import torch
    import triton

    if not dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; use --dry-run to exercise the steps on CPU")
        return 2
    started = time.time()
    sections = []
    failed = []
    for name, argv, limit in steps(dry_run):
        t0 = time.time()
        print(f"== {name}: {' '.join(argv[:4])} ... (limit {limit} s)", flush=True)
        try:
            proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"FAILED (over its {limit} s limit)"
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        if status != "ok":
            failed.append(name)
        seconds = time.time() - t0
        print(f"   {status} in {seconds:.0f} s", flush=True)
        tail = "\n".join(output.strip().splitlines()[-60:])
        shown = ["<built-in CUDA test runner>" if a == _MINI_RUNNER else os.path.relpath(a, REPO)
                 if a.startswith(REPO) else a for a in argv]
        sections.append(f"### {name}: {status}, {seconds:.0f} s\n\n`{' '.join(shown)}`\n\n```\n{tail}\n```\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"\n## gpu-check{' (dry run, CPU-sized)' if dry_run else ''}: {stamp}\n\n"
              f"Device {_device()}; commit {_commit()}; torch {torch.__version__}, triton {triton.__version__}, "
              f"python {platform.python_version()}; "
              f"tests through {'pytest' if _pytest_available() else 'the built-in runner'}; "
              f"total {time.time() - started:.0f} s; failed steps: {', '.join(failed) or 'none'}.\n\n")
    with open(out_path, "a") as f:
        f.write(header + "\n".join(sections))
    print(f"gpu-check: appended to {out_path}; failed steps: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: the same steps at CPU-sized arguments")
    ap.add_argument("--no-pytest", action="store_true", help="run the CUDA tests with the built-in runner")
    ap.add_argument("--out", default=None, help=f"results file (default {os.path.relpath(RESULTS, REPO)}; a dry run "
                                                "needs one, so that the real results file only gets GPU runs)")
    args = ap.parse_args()
    if args.no_pytest:
        os.environ["GPU_CHECK_NO_PYTEST"] = "1"
    if args.dry_run and args.out is None:
        raise SystemExit("gpu_check: --dry-run needs --out PATH (bench/RESULTS.md keeps only GPU runs)")
    sys.exit(run(args.dry_run, args.out or RESULTS))


if __name__ == "__main__":
    main()
