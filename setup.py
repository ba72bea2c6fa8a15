"""The optional native CPU kernels `ville_kernels._C` (csrc/). Everything else about the package (name, version,
dependency ranges, packages) is static metadata in pyproject.toml.
"""
import os
import sys

from setuptools import setup


def native_extension():
    """(ext_modules, cmdclass) for the optional native CPU kernels `ville_kernels._C` (csrc/).

    Optional by design: with VILLE_NO_EXT=1, without torch at build time, or when compiling fails, the install still
    succeeds and ville_kernels uses its PyTorch paths (ville_kernels.backends() tells which one runs)."""
    if os.environ.get("VILLE_NO_EXT", "0") == "1":
        print("ville: VILLE_NO_EXT=1, skipping the native CPU kernels (csrc); the PyTorch paths will be used",
              file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:
        print(f"ville: torch not importable at build time ({exc}); skipping the native CPU kernels (csrc)",
              file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, a compile error, ...: install the pure-Python package anyway
                print(f"ville: native CPU kernels (csrc) not built ({type(exc).__name__}: {exc}); "
                      "the PyTorch paths will be used", file=sys.stderr)
                self.extensions = []

    import torch

    # The C++ standard comes from torch (C++20 for torch >= 2.10); the version lets native.py detect a mismatch.
    flags = ["-O3", "-fopenmp", f'-DVILLE_TORCH_VERSION="{torch.__version__}"']
    sources = ["csrc/module.cpp", "csrc/infonce.cpp", "csrc/decode_attention.cpp"]
    ext = CppExtension("ville_kernels._C", sources=sources, extra_compile_args={"cxx": flags},
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
