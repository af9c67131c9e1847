"""Conversion between Hugging Face checkpoints and our megatron-core models (see docs/models.md).

The names below are imported from their submodules on first use, so that importing one submodule (as
:mod:`lightning_megatron.pretrained` imports ``convert.consolidated`` and ``convert.hf``) does not import the others:
``convert.export`` itself builds on :mod:`lightning_megatron.pretrained`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_SUBMODULE = {
    "ARCHITECTURES": "hf",
    "ConversionError": "core",
    "build_module": "core",
    "checkpoint_to_hf": "export",
    "converted_to_hf": "hf",
    "export_consolidated": "consolidated",
    "export_hf": "hf",
    "gather_consolidated": "consolidated",
    "hf_to_checkpoint": "hf",
    "import_consolidated": "consolidated",
    "load_any_checkpoint": "export",
    "load_checkpoint": "hf",
    "load_consolidated": "consolidated",
    "load_hf": "hf",
    "module_from_checkpoint": "hf",
    "module_from_hf": "hf",
}
"""Each public name and the submodule that defines it."""


def __getattr__(name: str) -> Any:
    """The public ``name``, imported from its submodule (``from lightning_megatron.convert import export_hf``)."""
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_SUBMODULE[name]}"), name)


__all__ = sorted(_SUBMODULE)
