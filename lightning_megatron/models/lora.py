"""LoRA: low-rank adapters on megatron-core's linear layers, correct under every TP/SP/PP/CP/DP layout.

An adapter adds ``(alpha / rank) * B(A(dropout(x)))`` to the output of its base layer, and sits next to it (the
base layer ``linear_qkv`` gets the sibling ``linear_qkv_lora``, with parameters ``a.weight`` and ``b.weight``), so
the base weights keep their names and load from any checkpoint of the base model. A forward hook on the base layer
adds the adapter's output; nothing of megatron's layers is replaced.

The adapter is split the way its base layer is, so that its output shard matches the base's:

* column-parallel base (``qkv``, ``fc1``): ``A`` is replicated (full input -> rank) and ``B`` is a
  ``ColumnParallelLinear`` (rank -> this rank's output shard); under sequence parallelism the input is gathered;
* row-parallel base (``proj``, ``fc2``): ``A`` is a ``RowParallelLinear`` on the split input (its rank-sized output
  all-reduced, or reduce-scattered over the sequence under SP) and ``B`` is replicated (rank -> full output).

So merging is local to each rank: ``W_shard += (alpha / rank) * B_shard @ A_shard``. The adapters' sharded state
dict carries megatron's TP metadata (a gated ``fc1``'s ``B`` is split like ``fc1`` itself), so they save, load and
reshard across layouts like every other weight. ``A`` is drawn layout-invariantly from the model's seed and ``B``
starts at zero, so a fresh LoRA model computes exactly what its base does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import sharded_state_dict_default

from lightning_megatron.errors import UserError
from lightning_megatron.models.layers import draw_normal, global_name

Target = Literal["qkv", "proj", "fc1", "fc2"]
TARGET_LAYERS: dict[str, str] = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1",
                                 "fc2": "linear_fc2"}
"""Each target's megatron layer: attention's fused QKV and output projection, the MLP's input (gate and up when
gated) and output."""
ADAPTER_SUFFIX = "_lora"


@dataclass
class LoRAConfig:
    """Which linear layers get adapters, and their rank, scale and dropout."""

    rank: int = 8
    alpha: float = 16.0
    """The adapter's output is scaled by ``alpha / rank``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (drawn independently per rank: not layout-invariant)."""
    targets: list[Target] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    adapters_only: bool = False
    """Checkpoints hold only the adapters (and the optimizer and trainer state); with ``init_from`` of the base
    model they restore the whole model."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGET_LAYERS]
        if unknown or not self.targets:
            raise UserError(f"lora.targets={list(self.targets)} must be a non-empty list of "
                            f"{', '.join(TARGET_LAYERS)}; set model.init_args.lora.targets")
        if self.rank < 1:
            raise UserError(f"lora.rank={self.rank} must be at least 1; set model.init_args.lora.rank")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout={self.dropout} must be in [0, 1); set model.init_args.lora.dropout")

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on the adapter's output."""
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    """Whether a state-dict name (or checkpoint key) belongs to a LoRA adapter."""
    return f"{ADAPTER_SUFFIX}." in name


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one megatron linear layer, split over tensor parallelism as its base is."""

    def __init__(self, base: ColumnParallelLinear | RowParallelLinear, config: LoRAConfig, gated: bool) -> None:
        super().__init__()
        self.scale = config.scale
        self.gated = gated
        self.column = isinstance(base, ColumnParallelLinear)
        self.sequence_parallel = base.config.sequence_parallel
        self.dropout = torch.nn.Dropout(config.dropout)
        replicated = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        if self.column:
            self.a = torch.nn.Linear(base.input_size, config.rank, **replicated)
            # B's input is the full sequence whatever the base layer's sequence parallelism.
            self.b = ColumnParallelLinear(config.rank, base.output_size, bias=False, gather_output=False,
                                          config=dataclasses.replace(base.config, sequence_parallel=False),
                                          init_method=torch.nn.init.zeros_)
        else:
            self.a = RowParallelLinear(base.input_size, config.rank, bias=False, input_is_parallel=True,
                                       skip_bias_add=True, config=base.config, init_method=torch.nn.init.zeros_)
            self.b = torch.nn.Linear(config.rank, base.output_size, **replicated)
            torch.nn.init.zeros_(self.b.weight)
            # Under SP each rank sees its own slice of the sequence, so B's gradient is a partial sum that megatron's
            # finalize_model_grads all-reduces over TP for parameters marked so (as for the norms).
            self.b.weight.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update to add to the base layer's output for its input ``x``."""
        if self.column:
            if self.sequence_parallel:
                # B's column-parallel linear all-reduces the gradient of A's output, so the gradient reaching x is
                # already whole on every rank: split it back, do not reduce it again.
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            update, _ = self.b(self.a(self.dropout(x)))
        else:
            hidden, _ = self.a(self.dropout(x))
            update = self.b(hidden)
        return update * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` for this rank's shard of the base weight."""
        return (self.b.weight.float() @ self.a.weight.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
                           ) -> dict[str, Any]:
        """A and B with megatron's sharding metadata (a gated fc1's B split per half, like fc1)."""
        state: dict[str, Any] = {}
        # Without the TP group megatron would mark the replicated factor as the main copy on every TP rank.
        group = parallel_state.get_tensor_model_parallel_group()
        for name in ("a", "b"):
            state.update(sharded_state_dict_default(getattr(self, name), f"{prefix}{name}.", sharded_offsets,
                                                    metadata, tp_group=group))
        if self.gated:
            key = f"{prefix}b.weight"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets,
                                                      (metadata or {}).get("singleton_local_shards", False))
        return state


def _add_update(adapter: LoRAAdapter):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        x = args[0] if args else kwargs["input_"]
        out, bias = output
        return out + adapter(x).to(out.dtype), bias

    return hook


def _targets(chunk: torch.nn.Module, targets: Sequence[str]) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """(parent's name, parent, layer name) of every targeted megatron linear layer in a chunk."""
    layers = {TARGET_LAYERS[t] for t in targets}
    for parent_name, parent in list(chunk.named_modules()):
        for name, child in list(parent.named_children()):
            if name in layers and isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                yield parent_name, parent, name


def add_adapters(chunk: torch.nn.Module, config: LoRAConfig, seed: int, gated_linear_unit: bool) -> None:
    """Give every targeted linear layer of a built model chunk an adapter, and freeze everything else."""
    added = 0
    for parent_name, parent, name in _targets(chunk, config.targets):
        base = getattr(parent, name)
        adapter = LoRAAdapter(base, config, gated=gated_linear_unit and name == "linear_fc1")
        parent.add_module(name + ADAPTER_SUFFIX, adapter)
        adapter.hook = base.register_forward_hook(_add_update(adapter), with_kwargs=True)
        local_name = f"{parent_name}.{name}{ADAPTER_SUFFIX}.a.weight".lstrip(".")
        draw_normal(adapter.a.weight, global_name(local_name, chunk), seed, 1.0 / math.sqrt(base.input_size))
        added += 1
    if not added:
        raise UserError(f"lora.targets={list(config.targets)} match no linear layer of this model; use "
                        f"{', '.join(TARGET_LAYERS)}")
    for name, param in chunk.named_parameters():
        param.requires_grad = is_adapter(name)


def adapters(chunks: Sequence[torch.nn.Module]) -> list[tuple[torch.nn.Module, str]]:
    """(parent, base layer name) of every adapter in the chunks."""
    return [(parent, name.removesuffix(ADAPTER_SUFFIX)) for chunk in chunks for parent in chunk.modules()
            for name, child in parent.named_children() if isinstance(child, LoRAAdapter)]


@torch.no_grad()
def merge_adapters(chunks: Sequence[torch.nn.Module]) -> int:
    """Fold every adapter into its base weight (per TP shard) and remove it; returns how many were merged.

    The merged model computes what the adapted one did, with the base model's parameters and speed; it is no longer
    a LoRA model (nothing is frozen), e.g. for export or inference.
    """
    found = adapters(chunks)
    for parent, name in found:
        base, adapter = getattr(parent, name), getattr(parent, name + ADAPTER_SUFFIX)
        base.weight.add_(adapter.delta().to(base.weight.dtype))
        adapter.hook.remove()
        delattr(parent, name + ADAPTER_SUFFIX)
    if found:
        for chunk in chunks:
            chunk.requires_grad_(True)
    return len(found)


def adapter_state(state: dict[str, Any]) -> dict[str, Any]:
    """The adapter entries of a chunk's (sharded) state dict."""
    return {name: value for name, value in state.items() if is_adapter(name)}


__all__ = ["LoRAAdapter", "LoRAConfig", "TARGET_LAYERS", "add_adapters", "adapter_state", "adapters", "is_adapter",
           "merge_adapters"]
