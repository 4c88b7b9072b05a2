"""vit_jax: fine-tune the original Google ViT checkpoints with JAX/Flax, serve from PyTorch."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name: str) -> list[str]:
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setuptools.setup(
  name="vit_jax",
  version="0.1.0",
  description="Fine-tune the original Google Vision Transformer checkpoints in JAX/Flax.",
  long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["vit_jax", "vit_jax.*", "configs"]),  # configs too
  python_requires=">=3.10",
  install_requires=_requirements("requirements.txt"),
  extras_require={
    # PyTorch side: conversion to timm / Hugging Face and the parity tests.
    "torch": _requirements("requirements-torch.txt"),
    "test": _requirements("requirements-test.txt"),
  },
  license="Apache-2.0",
)
