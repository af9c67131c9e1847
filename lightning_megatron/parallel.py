"""Process groups, megatron's parallel state, and the wrapping of model chunks.

:class:`ParallelConfig` is the layout a user asks for; :meth:`ParallelConfig.validate` checks it against the world
and the model before any process group exists, so a bad layout fails on every rank with a message naming the fix
instead of hanging in a collective.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from lightning_megatron.errors import UserError


class LayoutError(UserError):
    """A parallel layout or batch size that cannot work; the message says what to change."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and the data are split across processes; data parallel is whatever remains."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False

    @property
    def vp(self) -> int | None:
        """The virtual pipeline size megatron is given: ``None`` unless it actually interleaves (> 1)."""
        vp = self.virtual_pipeline_model_parallel_size
        return vp if vp is not None and vp > 1 else None

    @property
    def seq_len_divisor(self) -> int:
        """What every sequence length must be a multiple of: context parallelism cuts a sequence into 2 x CP
        chunks, and sequence parallelism splits each rank's tokens over TP."""
        cp = self.context_parallel_size
        return cp * math.lcm(2 if cp > 1 else 1, self.tensor_model_parallel_size if self.sequence_parallel else 1)

    def check_sequence_length(self, seq_length: int) -> None:
        """Raise :class:`LayoutError` if sequences of ``seq_length`` tokens cannot be split over this layout."""
        divisor = self.seq_len_divisor
        if seq_length % divisor:
            raise LayoutError(
                f"sequence length {seq_length} does not split over context_parallel_size="
                f"{self.context_parallel_size} (2 x CP chunks) and sequence_parallel={self.sequence_parallel} (TP "
                f"parts); choose a seq_length that is a multiple of {divisor}"
            )

    @property
    def model_parallel_size(self) -> int:
        """Processes that hold one replica of the model."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Replicas of the model in a world of ``world_size`` processes."""
        return world_size // self.model_parallel_size

    def validate(self, world_size: int) -> None:
        """Raise :class:`LayoutError` if this layout cannot split ``world_size`` processes."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} must be >= 1, got {getattr(self, name)}")
        if world_size % self.model_parallel_size:
            raise LayoutError(
                f"tensor_model_parallel_size ({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x context_parallel_size ({self.context_parallel_size}) = "
                f"{self.model_parallel_size} does not divide the {world_size} processes; set the Trainer's devices x "
                f"num_nodes to a multiple of {self.model_parallel_size}"
            )
        if self.vp is not None and self.pipeline_model_parallel_size < 2:
            raise LayoutError(
                "virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2; "
                "unset it or raise the pipeline size"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise LayoutError("sequence_parallel needs tensor_model_parallel_size >= 2; turn it off or raise TP")

    def validate_model(self, num_layers: int, num_attention_heads: int, num_query_groups: int | None = None) -> None:
        """Raise :class:`LayoutError` if the model's layers or heads do not split over this layout."""
        tp = self.tensor_model_parallel_size
        if num_attention_heads % tp:
            raise LayoutError(
                f"num_attention_heads={num_attention_heads} is not divisible by tensor_model_parallel_size={tp}; "
                f"choose a TP size that divides the head count"
            )
        if num_query_groups is not None and num_query_groups % tp:
            raise LayoutError(
                f"num_query_groups={num_query_groups} is not divisible by tensor_model_parallel_size={tp}; "
                f"choose a TP size that divides the number of key/value heads"
            )
        stages = self.pipeline_model_parallel_size * (self.vp or 1)
        if num_layers % stages:
            raise LayoutError(
                f"num_layers={num_layers} does not split into pipeline ({self.pipeline_model_parallel_size}) x "
                f"virtual pipeline ({self.virtual_pipeline_model_parallel_size or 1}) = {stages} equal stages; "
                f"choose sizes whose product divides the layer count"
            )

    def transformer_fields(self) -> dict[str, Any]:
        """The fields of megatron's ``TransformerConfig`` that this layout determines."""
        return {
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": self.vp,
            "context_parallel_size": self.context_parallel_size,
            "sequence_parallel": self.sequence_parallel,
        }


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recomputation: ``selective`` recomputes core attention in backward; ``full`` recomputes whole
    layers (``method`` ``uniform`` or ``block``, over ``num_layers``)."""

    granularity: Literal["selective", "full"] | None = None
    method: Literal["uniform", "block"] | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.granularity == "full" and (self.method is None or self.num_layers is None):
            raise UserError(
                "recompute_granularity='full' needs recompute_method ('uniform' or 'block') and recompute_num_layers"
            )

    def transformer_fields(self) -> dict[str, Any]:
        """The fields of megatron's ``TransformerConfig`` that recomputation determines."""
        full = self.granularity == "full"
        return {
            "recompute_granularity": self.granularity,
            "recompute_method": self.method if full else None,
            "recompute_num_layers": self.num_layers if full else None,
        }


@dataclass(frozen=True)
class DDPConfig:
    """How gradients and parameters are synchronised across data-parallel ranks (megatron's DDP and optimizer)."""

    use_distributed_optimizer: bool = False
    """Shard the fp32 main parameters and optimizer state across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    fuse_wgrad_accumulation: bool = True
    """GPU runs: each weight-gradient GEMM accumulates into the fp32 main gradient itself (megatron's
    ``gradient_accumulation_fusion``; torch's ``addmm`` where Apex is absent) instead of two more passes per weight."""

    def megatron(self) -> DistributedDataParallelConfig:
        """megatron's DDP config: these options, gradients reduced in fp32."""
        options = asdict(self)
        del options["fuse_wgrad_accumulation"]  # a TransformerConfig field (see strategy.transformer_fields)
        return DistributedDataParallelConfig(grad_reduce_in_fp32=True, **options)


def initialize(config: ParallelConfig, seed: int, cudagraphable_rng: bool = False) -> None:
    """Create megatron's process groups on top of the initialised default group, and seed its RNG tracker (one
    that CUDA graphs can capture if ``cudagraphable_rng``).

    Groups left by an earlier run in this process (kept so that it can still save after ``fit`` returns) are
    replaced."""
    destroy()
    before = _live_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.vp,
        context_parallel_size=config.context_parallel_size,
    )
    _megatron_groups.extend(group for group in _live_groups() if group not in before)
    # megatron creates its tracker once per process; one that graphs can capture replaces an earlier plain one.
    model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=cudagraphable_rng, force_reset_rng=cudagraphable_rng)


# The groups ``initialize`` created: megatron's ``destroy_model_parallel`` forgets its groups without destroying them,
# and each gloo group keeps polling threads alive until the default group goes (thousands after a few re-fits).
_megatron_groups: list[torch.distributed.ProcessGroup] = []


def _live_groups() -> list[torch.distributed.ProcessGroup]:
    """Every process group torch.distributed holds now (its registry is private: torch offers no public list)."""
    if not torch.distributed.is_initialized():
        return []
    return list(torch.distributed.distributed_c10d._world.pg_map)


def destroy() -> None:
    """Tear down megatron's process groups (the default group is left to Lightning)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not _megatron_groups:
        return
    live = _live_groups()
    for group in _megatron_groups:
        if group in live:
            torch.distributed.destroy_process_group(group)
    _megatron_groups.clear()
    # A gloo group's threads stop only when the group is freed, and a finished run's model and optimizer hold
    # theirs in reference cycles.
    gc.collect()


def stage_layout() -> list[tuple[bool, bool, int | None]]:
    """``(pre_process, post_process, vp_stage)`` of each model chunk this rank builds."""
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp_size is None or vp_size == 1:
        return [(parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(), None)]
    return [
        (
            parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            stage,
        )
        for stage in range(vp_size)
    ]


def build_chunks(build_stage: Callable[[bool, bool, int | None], torch.nn.Module]) -> list[torch.nn.Module]:
    """Build the model chunks of this rank: one per pipeline stage it holds (several with a virtual pipeline)."""
    return [build_stage(pre, post, vp_stage) for pre, post, vp_stage in stage_layout()]


def compile_layers(chunks: Sequence[torch.nn.Module]) -> None:
    """Compile every transformer layer in place with ``torch.compile`` (one graph per layer, reused by all layers)."""
    for chunk in chunks:
        for layer in chunk.modules():
            if isinstance(layer, TransformerLayer):
                layer.compile()


def wrap_chunks(
    chunks: Sequence[torch.nn.Module], config: TransformerConfig, ddp_config: DistributedDataParallelConfig | None
) -> list[torch.nn.Module]:
    """Cast chunks to the training dtype (megatron's ``Float16Module``) and, given a DDP config, wrap them in
    megatron's DDP (whose fp32 gradient buffer a run that never trains does not need)."""
    wrapped: list[torch.nn.Module] = []
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, DistributedDataParallel):  # wrapped by an earlier run of the same module
            wrapped.append(chunk)
            continue
        if (config.fp16 or config.bf16) and not isinstance(chunk, Float16Module):
            chunk = Float16Module(config, chunk)
        if ddp_config is not None:
            # Later chunks overlap their communication with compute anyway; megatron's loop does the same.
            chunk = DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        wrapped.append(chunk)
    return wrapped


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP and Float16Module wrappers."""
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk
