"""Which optional backends this process can use, detected once, in one place."""

from __future__ import annotations

import importlib.util

import torch


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE: bool = _importable("transformer_engine")
"""Transformer Engine is installed (fp8, TE layer specs, ring attention for context parallelism)."""

HAVE_APEX: bool = _importable("apex") and _importable("apex.normalization")
"""NVIDIA Apex is installed (the PyPI package named ``apex`` is unrelated and is not counted)."""


def have_cuda() -> bool:
    """A CUDA device is usable by this process."""
    return torch.cuda.is_available()
