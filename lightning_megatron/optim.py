"""The optimizer a module asks for, built as megatron-core's optimizer and learning-rate scheduler.

A module's ``configure_optimizers`` returns an :class:`OptimConfig`; the strategy builds megatron's optimizer
(fp32 main parameters, global-norm clipping across all model-parallel ranks, optionally the distributed optimizer)
over every model chunk, and megatron's ``OptimizerParamScheduler`` for warmup and decay.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Sequence

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lightning_megatron.errors import UserError


@dataclass
class OptimConfig:
    """AdamW or SGD with linear warmup and a decay to ``min_lr``."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int | None = None
    """Steps from the start to the end of the decay; ``None`` means the trainer's ``max_steps``."""
    decay_style: Literal["cosine", "linear", "constant", "inverse-square-root", "WSD"] = "cosine"
    fused: bool = False
    """Adam through torch's fused kernel (one launch per step) where megatron falls back to torch's multi-tensor
    AdamW (no Apex or Transformer Engine); Apex's and TE's Adam are fused already."""


def build_optimizer(
    config: OptimConfig,
    chunks: Sequence[torch.nn.Module],
    use_distributed_optimizer: bool,
    precision_fields: dict[str, Any],
    **extra: Any,
):
    """megatron-core's optimizer over all model chunks of this rank."""
    # OptimConfig's fields keep OptimizerConfig's names; the schedule's (warmup, decay) go to build_scheduler.
    known = {f.name for f in fields(OptimizerConfig)}
    shared = {f.name: getattr(config, f.name) for f in fields(config) if f.name in known}
    megatron_config = OptimizerConfig(
        **shared, use_distributed_optimizer=use_distributed_optimizer, **precision_fields, **extra
    )
    optimizer = get_megatron_optimizer(megatron_config, list(chunks))
    if config.fused:
        use_fused_adam(optimizer)
    return optimizer


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's optimizer (one per chained part)."""
    return [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])]


def use_fused_adam(optimizer: Any) -> None:
    """Switch megatron's fallback Adam, torch's AdamW, to torch's fused kernel (its options live in the groups)."""
    for inner in torch_optimizers(optimizer):
        if type(inner) is torch.optim.AdamW:
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def build_scheduler(config: OptimConfig, optimizer: Any, max_steps: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler, stepped once per optimizer step."""
    decay_steps = config.decay_steps if config.decay_steps is not None else max_steps
    if decay_steps is None or decay_steps <= 0:
        raise UserError("OptimConfig.decay_steps is unset and the trainer has no max_steps; set one of them")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if config.warmup_steps else config.lr,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.warmup_steps,
        lr_decay_steps=max(decay_steps, config.warmup_steps + 1),
        lr_decay_style=config.decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
    )
