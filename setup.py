"""ville: a ViLL-E-style video LLM that writes text and emits adaptive-length retrieval embeddings.

`kernels/` is installed as the import package `ville_kernels` (the bare name `kernels` is taken on the package
index); `ville` imports it, never the other way round. `data_tools/` holds offline generators and converters.
"""
import sys

from setuptools import setup

install_requires = [
    "torch>=2.5",
    "transformers>=5.0,<6",
    "timm>=1.0",
    "webdataset>=0.2.90",
    "av>=12",
    "einops>=0.7",
    "pyyaml>=6",
    "omegaconf>=2.3",
    "safetensors>=0.4",
    "peft>=0.13",
    "tensorboard>=2.14",
    "tqdm>=4.60",
    "numpy>=1.24",
    "matplotlib>=3.7",
    "scipy>=1.10",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="ville",
    version="0.1.0",
    description="ViLL-E-style video LLM: text generation and adaptive-length video embeddings",
    python_requires=">=3.10",
    packages=["ville", "ville_kernels", "data_tools", "data_tools.converters"],
    package_dir={"ville": "ville", "ville_kernels": "kernels", "data_tools": "data_tools"},
    package_data={"data_tools": ["SCHEMA.md"]},
    install_requires=install_requires,
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2"],
        "gpu": ["xformers"],
    },
)
