"""Conversion between Hugging Face checkpoints and our megatron-core models (see docs/models.md)."""

from lightning_megatron.convert.consolidated import (
    export_consolidated,
    gather_consolidated,
    import_consolidated,
    load_consolidated,
)
from lightning_megatron.convert.core import ConversionError, build_module
from lightning_megatron.convert.export import checkpoint_to_hf, load_any_checkpoint
from lightning_megatron.convert.hf import (
    ARCHITECTURES,
    converted_to_hf,
    export_hf,
    hf_to_checkpoint,
    load_checkpoint,
    load_hf,
    module_from_checkpoint,
    module_from_hf,
)

__all__ = [
    "ARCHITECTURES",
    "ConversionError",
    "build_module",
    "checkpoint_to_hf",
    "converted_to_hf",
    "export_consolidated",
    "export_hf",
    "gather_consolidated",
    "hf_to_checkpoint",
    "import_consolidated",
    "load_any_checkpoint",
    "load_checkpoint",
    "load_consolidated",
    "load_hf",
    "module_from_checkpoint",
    "module_from_hf",
]
