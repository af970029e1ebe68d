"""Packaging for prograd_fast.

Layout (the design card): ``prograd_fast/`` (Python API), ``kernels/`` (Triton, installed as
``prograd_fast.kernels``), ``csrc/`` (C++/CUDA sources, shipped as ``prograd_fast.csrc`` and
compiled just in time with ninja through ``torch.utils.cpp_extension``, cached per machine).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["prograd_fast", "prograd_fast.*"])
packages += ["prograd_fast.kernels", "prograd_fast.csrc"]

setup(
    name="prograd_fast",
    version="0.1.0",
    description="Fast, drop-in ProGrad (prompt-aligned gradient) prompt tuning for CLIP models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"prograd_fast.kernels": "kernels", "prograd_fast.csrc": "csrc"},
    package_data={"prograd_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "open_clip_torch>=2.24",
        "ninja",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "matplotlib",
                 # Dassl's runtime, for the tests that run the example inside real Dassl
                 "yacs", "tabulate", "gdown", "tensorboard", "scipy", "wilds", "future",
                 "expecttest"],  # torch.testing._internal (its OptimizerInfo inputs)
        "demo": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["prograd-fast=prograd_fast.cli:main"]},
)
