"""Weights of a small model as one safetensors file of full tensors under single-process (TP=1, PP=1) names.

:func:`export_consolidated` gathers every rank's shards onto rank 0 and writes
``decoder.layers.<global index>.<...>`` names exactly as an unsplit model's ``state_dict()`` has them, whatever the
layout, so files from different layouts compare tensor by tensor. :func:`import_consolidated` loads such a file
into any layout. Everything passes through rank 0's memory: meant for models of a few GB at most; larger models
keep the sharded checkpoint (see :mod:`lightning_megatron.checkpoint`).

Placement comes from megatron's own sharded state dict (global shape and offset of every shard, layers stacked
on a leading axis), so gated MLPs and grouped-query attention, whose TP shards are not plain slices of the full
tensor, come out right.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from safetensors.torch import load_file, save_file

from lightning_megatron.checkpoint import model_sharded_state_dict, raise_on_any_rank, sharded_tensors
from lightning_megatron.module import MegatronModule

_LAYER_INDEX = re.compile(r"(^|\.)layers\.\d+\.")


def _layer_template(name: str) -> str:
    """``decoder.layers.3.mlp.weight`` -> ``decoder.layers.{}.mlp.weight`` (the index is local to the stage)."""
    return _LAYER_INDEX.sub(lambda match: f"{match.group(1)}layers.{{}}.", name, count=1)


def _local_shards(module: MegatronModule) -> tuple[list[tuple[str, ShardedTensor]], dict[str, str]]:
    """This rank's model shards (per chunk, without the chunk prefix) and the name template of each global key."""
    assert module.chunks is not None, "the model is not built yet"
    shards: list[tuple[str, ShardedTensor]] = []
    for chunk_state in model_sharded_state_dict(module.chunks).values():
        shards.extend(sharded_tensors(chunk_state))
    templates: dict[str, str] = {}
    for name, tensor in shards:
        template = _layer_template(name)
        # A tied output layer is stored under the embedding's key: keep the embedding's own name.
        if tensor.key not in templates or template == tensor.key:
            templates[tensor.key] = template
    return shards, templates


def _names(key: str, template: str, shape: torch.Size) -> list[tuple[str, Any]]:
    """(name, index into the global tensor) of each tensor a global key stands for."""
    if "{}" in template:
        return [(template.format(layer), layer) for layer in range(shape[0])]
    return [(template, slice(None))]


def export_consolidated(module: MegatronModule, path: str | os.PathLike) -> None:
    """Write the full model weights to one safetensors file; call on every rank, rank 0 writes (atomically)."""
    shards, templates = _local_shards(module)
    pieces = [(t.key, tuple(t.global_shape), t.global_slice(), t.data.detach().cpu())
              for _, t in shards if is_main_replica(t.replica_id)]
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    gathered: list[Any] = [(pieces, templates)]
    if distributed and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((pieces, templates), gathered, dst=0)
    if rank == 0:
        full: dict[str, torch.Tensor] = {}
        names: dict[str, str] = {}
        for rank_pieces, rank_templates in gathered:
            for key, template in rank_templates.items():
                if key not in names or template == key:
                    names[key] = template
            for key, shape, where, data in rank_pieces:
                if key not in full:
                    full[key] = torch.zeros(shape, dtype=data.dtype)
                full[key][where] = data
        tensors = {name: full[key][index].clone().contiguous()
                   for key in sorted(full) for name, index in _names(key, names[key], full[key].shape)}
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "source": "lightning_megatron"})
        os.replace(tmp, target)
    if distributed:
        dist.barrier()


def import_consolidated(module: MegatronModule, path: str | os.PathLike) -> None:
    """Load a file written by :func:`export_consolidated` into this rank's shards (any layout); every rank reads it.

    When the strategy has built its optimizer, its fp32 main parameters are refreshed from the loaded weights.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"consolidated weights {path} do not exist")
    tensors = load_file(str(path))
    shards, templates = _local_shards(module)
    problems, updates = [], []
    for _, shard in shards:
        names = _names(shard.key, templates[shard.key], torch.Size(shard.global_shape))
        missing = [name for name, _ in names if name not in tensors]
        if missing:
            problems.append(f"{missing[0]} is missing from {path}")
            continue
        parts = [tensors[name] for name, _ in names]
        full = torch.stack(parts) if "{}" in templates[shard.key] else parts[0]
        if tuple(full.shape) != tuple(shard.global_shape):
            problems.append(f"{names[0][0]} has shape {tuple(parts[0].shape)} in {path}, the model expects "
                            f"{tuple(shard.global_shape)[1:] if len(names) > 1 else tuple(shard.global_shape)}")
            continue
        updates.append((shard.data, full[shard.global_slice()]))
    raise_on_any_rank(f"{path} does not fit this model: " + "; ".join(problems[:5]) if problems else None)
    with torch.no_grad():
        # The shards are views of the chunks' own parameters.
        for target, value in updates:
            target.copy_(value)
        trainer = module._trainer
        for optimizer in trainer.strategy.optimizers if trainer is not None else []:
            optimizer.reload_model_params()


__all__ = ["export_consolidated", "import_consolidated"]
