"""The consolidated form of a model's weights: full tensors under single-process names, from and into any layout.

A consolidated tensor is the whole tensor under the name an unsplit (TP=1, PP=1) model's ``state_dict()`` gives it:
``embedding.word_embeddings.weight``, ``decoder.layers.<global index>.self_attention.linear_qkv.weight``, ...
:func:`gather_consolidated` joins every rank's shards on rank 0; :func:`load_consolidated` cuts this rank's shards
out of any source of consolidated tensors (a safetensors file, an HF checkpoint mapped tensor by tensor), reading
only the tensors this rank holds. :func:`export_consolidated` and :func:`import_consolidated` store the form as one
safetensors file; :mod:`lightning_megatron.convert.hf` maps it to and from Hugging Face checkpoints.

Placement comes from megatron's own sharded state dict (each shard's global offset, layers stacked on a leading
axis, a gated MLP's halves as separate pieces, a tied output layer under the embedding's key), so nothing here
re-derives how megatron splits a tensor. Vocabulary tensors (:data:`VOCAB_TENSORS`) keep megatron's padding rows
unless ``unpad`` cuts them to the real vocabulary (as HF stores them); loading pads or cuts them to the module's
padded size. Everything passes through rank 0's memory on export: meant for models of a few GB at most; larger
models keep the sharded checkpoint (see :mod:`lightning_megatron.checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Any, Callable, Collection, Mapping

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_megatron.atomic import atomic_write
from lightning_megatron.checkpoint import CheckpointError, model_sharded_state_dict, raise_on_any_rank, sharded_tensors
from lightning_megatron.module import MegatronModule

VOCAB_TENSORS = frozenset({
    "embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias",
    "lm_head.output_layer.weight", "lm_head.output_layer.bias",
})
"""Consolidated tensors with one row per vocabulary entry (megatron pads them to a multiple of 128 x TP rows)."""


class TensorSource(ABC):
    """Consolidated tensors by name, each read on demand; a subclass sets :attr:`names` and implements :meth:`get`."""

    names: Collection[str]

    def keys(self) -> list[str]:
        """Every name the source holds."""
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The full tensor ``name``."""


class TensorDict(TensorSource):
    """Tensors held in memory (e.g. what :func:`gather_consolidated` returns)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], origin: str, error: type[Exception] = CheckpointError):
        self.names = self.tensors = tensors
        self.origin, self.error = origin, error

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise self.error(f"tensor {name!r} is missing from {self.origin}")
        return self.tensors[name]


_WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
_LOCAL_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def _local_shards(module: MegatronModule) -> list[tuple[str, ShardedTensor]]:
    """This rank's shards with the state-dict names they sit under (per chunk, local layer indices)."""
    if module.chunks is None:
        raise RuntimeError("the model is not built yet; call configure_model() or convert.build_module() first")
    shards, seen = [], set()
    for state in model_sharded_state_dict(module.chunks).values():
        for name, shard in sharded_tensors(state):
            # A module registered under two names (megatron's T5 aliases lm_head.output_layer) is one tensor.
            identity = (shard.data.data_ptr(), tuple(shard.data.shape))
            if identity not in seen:
                seen.add(identity)
                shards.append((name, shard))
    return shards


def _placement(name: str, shard: ShardedTensor) -> tuple[str, tuple[slice, ...], tuple[int, ...]]:
    """(consolidated name, where the shard sits in that tensor, the tensor's full shape).

    The consolidated name is the state-dict name, except for a tied output layer, which megatron keys (and we
    name) as the word embeddings it shares. A layer's tensor carries its global layer index on a prepended axis,
    which replaces the stage-local index in its name.
    """
    where = shard.global_slice()
    if shard.prepend_axis_num == 0:
        return shard.key if shard.key == _WORD_EMBEDDINGS else name, where, tuple(shard.global_shape)
    if shard.prepend_axis_num > 1 or not _LOCAL_LAYER.search(name):
        raise CheckpointError(f"{name} is stacked on {shard.prepend_axis_num} axes; only layer stacks are known")
    full_name = _LOCAL_LAYER.sub(lambda match: f"{match.group(1)}layers.{where[0]}.", name, count=1)
    return full_name, where[1:], tuple(shard.global_shape[1:])


def _vocab_size(module: MegatronModule) -> int:
    return int(module.config.vocab_size)


@torch.no_grad()
def gather_consolidated(module: MegatronModule, unpad: bool = False) -> dict[str, torch.Tensor] | None:
    """Every consolidated tensor of a built module of any layout, on global rank 0 (``None`` on the other ranks).

    Collective: every rank calls it. ``unpad`` cuts vocabulary tensors to the model's real vocabulary size.
    """
    pieces = []
    for local_name, shard in _local_shards(module):
        if is_main_replica(shard.replica_id):
            name, where, shape = _placement(local_name, shard)
            pieces.append((name, shape, where, shard.data.detach().cpu()))
    gathered: list[Any] = [pieces]
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(pieces, gathered, dst=0)
    if distributed and dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for name, shape, where, data in rank_pieces:
            if name not in full:
                full[name] = torch.zeros(shape, dtype=data.dtype)
            full[name][where] = data
    if unpad:
        for name in VOCAB_TENSORS & full.keys():
            full[name] = full[name][: _vocab_size(module)].clone()
    return dict(sorted(full.items()))


def _union_over_ranks(names: set[str]) -> set[str]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return names
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, names)
    return set().union(*every)


def _fit_vocab(tensor: torch.Tensor, rows: int, vocab_size: int) -> torch.Tensor:
    """A vocabulary tensor of at least ``vocab_size`` rows, its padding cut or zero-padded to ``rows``."""
    if tensor.shape[0] == rows or tensor.shape[0] < vocab_size:
        return tensor  # the shape check reports a real mismatch
    kept = tensor[:rows]
    return torch.cat([kept, kept.new_zeros(rows - kept.shape[0], *kept.shape[1:])]) if kept.shape[0] < rows else kept


@torch.no_grad()
def load_consolidated(module: MegatronModule, source: TensorSource, origin: str, vocab_size: int | None = None,
                      error: type[Exception] = CheckpointError, optional: Callable[[str], bool] | None = None) -> None:
    """Copy this rank's shards of a built module (any layout) out of ``source``'s consolidated tensors.

    ``vocab_size`` is the source's real vocabulary size: when given, its vocabulary tensors may be padded
    differently from the module's (rows past it are padding). Collective: every rank calls it; a tensor that is
    missing or of the wrong shape on any rank raises ``error`` on every rank, naming ``origin``, before any copy.
    Tensors whose name ``optional`` accepts keep their values when the source lacks them (new LoRA adapters).
    """
    problems: list[str] = []
    if vocab_size is not None and vocab_size != _vocab_size(module):
        problems.append(f"{origin} holds a vocabulary of {vocab_size}, the model has {_vocab_size(module)}")
    updates, used = [], set()
    for local_name, shard in _local_shards(module):
        name, where, shape = _placement(local_name, shard)
        if optional is not None and optional(name) and name not in source:
            continue
        used.add(name)
        if name not in source:
            problems.append(f"tensor {name!r} is missing from {origin}")
            continue
        full = source.get(name)
        if name in VOCAB_TENSORS and vocab_size is not None:
            full = _fit_vocab(full, shape[0], vocab_size)
        if tuple(full.shape) != shape:
            problems.append(f"tensor {name!r} has shape {list(full.shape)} in {origin} but the model expects "
                            f"{list(shape)}; the model config does not match the checkpoint's")
            continue
        part = full[where]
        # Keep only this rank's part, not the whole tensor it is a view of, until every rank has checked.
        updates.append((shard.data, part.clone() if part.numel() < full.numel() else part))
    unused = sorted(set(source.keys()) - _union_over_ranks(used))
    if unused:
        problems.append(f"{origin} holds {len(unused)} tensor(s) the model lacks: {', '.join(unused[:5])}")
    raise_on_any_rank("; ".join(problems[:5]) if problems else None, error)
    # The shards are views of the chunks' own parameters.
    for target, value in updates:
        target.copy_(value)


class SafetensorsFiles(TensorSource):
    """Tensors read one at a time from a safetensors file or a ``save_pretrained`` directory (single or indexed)."""

    def __init__(self, path: str | os.PathLike, error: type[Exception] = CheckpointError) -> None:
        self.path = Path(path)
        self.error = error
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if self.path.is_file():
            single = self.path
        self.metadata: dict[str, str] = {}
        """The single file's safetensors metadata (empty for an indexed directory)."""
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.names = self._files = {name: self.path / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(single, "pt") as handle:
                self.names = self._files = {name: single for name in handle.keys()}
                self.metadata = handle.metadata() or {}
        else:
            raise error(
                f"{self.path} has no model.safetensors or model.safetensors.index.json; save the model with "
                f"save_pretrained(..., safe_serialization=True) (PyTorch .bin checkpoints are not read)"
            )

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (and nothing else) from disk."""
        if name not in self._files:
            raise self.error(f"tensor {name!r} is missing from {self.path}")
        with safe_open(self._files[name], "pt") as handle:
            return handle.get_tensor(name)


def export_consolidated(module: MegatronModule, path: str | os.PathLike) -> None:
    """Write the full weights (vocabulary padding kept) to one safetensors file; every rank calls, rank 0 writes."""
    tensors = gather_consolidated(module)
    if tensors is not None:
        metadata = {"format": "pt", "source": "lightning_megatron", "vocab_size": str(_vocab_size(module))}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def import_consolidated(module: MegatronModule, path: str | os.PathLike) -> None:
    """Load a file of :func:`export_consolidated` into a built module of any layout; every rank calls and reads it.

    When the strategy has built its optimizer, its fp32 main parameters are refreshed from the loaded weights.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"consolidated weights {path} do not exist")
    source = SafetensorsFiles(path)
    vocab_size = source.metadata.get("vocab_size")
    load_consolidated(module, source, str(path), int(vocab_size) if vocab_size else None)
    trainer = module._trainer
    with torch.no_grad():
        for optimizer in trainer.strategy.optimizers if trainer is not None else []:
            optimizer.reload_model_params()


__all__ = [
    "SafetensorsFiles",
    "TensorDict",
    "TensorSource",
    "VOCAB_TENSORS",
    "export_consolidated",
    "gather_consolidated",
    "import_consolidated",
    "load_consolidated",
]
