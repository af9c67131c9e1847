"""Start a run from a checkpoint's weights (``init_from``): any checkpoint kind, any layout, into any layout.

Unlike resuming (``--ckpt_path``), only the model's weights are taken: the optimizer is built fresh from them and
training starts at step 0. Three kinds of checkpoint are read:

* a directory saved by training (``last.ckpt``; megatron's sharded tensors, resharded to this run's layout);
* a directory written by ``convert hf-to-megatron`` (consolidated tensors and ``lightning_megatron.json``);
* a consolidated ``.safetensors`` file (:func:`~lightning_megatron.convert.consolidated.export_consolidated`).

A LoRA model's adapters are new unless the checkpoint holds them (a LoRA run's own checkpoint), so a base model's
checkpoint loads into it; everything else must be in the checkpoint with the model's shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from megatron.core import dist_checkpointing

from lightning_megatron.checkpoint import (
    CheckpointError,
    MegatronCheckpointIO,
    damaged_files,
    model_sharded_state_dict,
    read_saved_module,
)
from lightning_megatron.convert.consolidated import SafetensorsFiles, load_consolidated
from lightning_megatron.convert.hf import converted, read_checkpoint_metadata
from lightning_megatron.models.lora import is_adapter
from lightning_megatron.module import MegatronModule
from lightning_megatron.parallel import unwrap


def load_pretrained(module: MegatronModule, path: str | os.PathLike) -> None:
    """Load the weights of checkpoint ``path`` into the built chunks of ``module`` (collective: every rank calls)."""
    path = Path(path)
    origin = f"init_from {path}"
    if not path.exists():
        raise CheckpointError(f"{origin} does not exist; set model.init_args.init_from to a checkpoint saved by "
                              f"training (e.g. runs/gpt-tiny/checkpoints/last.ckpt), a directory written by "
                              f"'convert hf-to-megatron' or a consolidated .safetensors file")
    optional = is_adapter if module.lora is not None else None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{origin} is a file but not a consolidated .safetensors file; pass a checkpoint "
                                  f"directory saved by training or written by 'convert hf-to-megatron'")
        source = SafetensorsFiles(path)
        vocab_size = source.metadata.get("vocab_size")
        load_consolidated(module, source, origin, int(vocab_size) if vocab_size else None, CheckpointError, optional)
    elif converted(path):
        vocab_size = read_checkpoint_metadata(path)["config"]["vocab_size"]
        load_consolidated(module, SafetensorsFiles(path, CheckpointError), origin, vocab_size, CheckpointError,
                          optional)
    else:
        _load_sharded(module, path)
    rank_zero_info(f"Initialised the model's weights from {path}")


def _load_sharded(module: MegatronModule, path: Path) -> None:
    saved_module = read_saved_module(path)
    damaged = damaged_files(path)
    if damaged:
        raise CheckpointError(f"init_from {path} is damaged: {'; '.join(damaged)}; copy it again")
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    if saved and all(is_adapter(key) for key in saved):
        base = f" ({saved_module.base})" if saved_module.base else ""
        raise CheckpointError(f"init_from {path} holds only LoRA adapters ({saved_module.layout.describe()}); set "
                              f"init_from to the base model's checkpoint{base} and resume the adapters with "
                              f"--ckpt_path")
    assert module.chunks is not None

    # New adapters keep their initial values; adapters the checkpoint holds (a LoRA run's) are loaded.
    with_adapters = any(is_adapter(key) for key in saved)
    template = {chunk_name: {name: value for name, value in state.items() if with_adapters or not is_adapter(name)}
                for chunk_name, state in model_sharded_state_dict(module.chunks).items()}
    loaded = MegatronCheckpointIO().load_sharded(path, template)
    for chunk_name, chunk in zip(template, module.chunks):
        unwrap(chunk).load_state_dict(loaded[chunk_name], strict=not module.lora)


__all__ = ["load_pretrained"]
