"""Builds megalite and its C++ extension (megalite._C, from csrc/)."""

import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "megalite._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megalite",
    version="0.1.0",
    description="Megatron-style 3D-parallel LLM training: data, pretraining, alignment.",
    packages=find_packages(include=["megalite", "megalite.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    # torch is deliberately not pinned here: the Makefile installs the CPU build where there is no
    # CUDA, and a bare requirement would pull a multi-GB CUDA wheel on top of an existing install.
    install_requires=["numpy", "pyyaml", "safetensors", "sentencepiece", "tokenizers", "tiktoken",
                      "zstandard", "pyarrow", "tqdm"],
    extras_require={
        # lm-eval is heavy (datasets, pandas, scikit-learn: ~2 min to install) but CI must test the
        # lm-evaluation-harness adapter, so the test extra carries it. torchao declares no torch
        # requirement, so it never pulls another torch build.
        "test": ["pytest", "pytest-timeout", "ruff", "triton>=3.0", "transformers", "tensorboard==2.21.0",
                 "lm-eval==0.4.13", "torchao==0.18.0"],
        # `megalite eval` runs without it; the lm-evaluation-harness adapter needs it.
        "eval": ["lm-eval==0.4.13"],
        "logging": ["tensorboard==2.21.0", "wandb==0.31.0"],
        "triton": ["triton>=3.0"],
        "fp8-torchao": ["torchao==0.18.0"],  # train.fp8_backend=torchao
        "demo": ["matplotlib==3.11.2"],  # the plots in runs/demo/REPORT.md
    },
    entry_points={"console_scripts": ["megalite=megalite.cli:main"]},
)
