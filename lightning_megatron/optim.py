"""The optimizer a module asks for, built as megatron-core's optimizer and learning-rate scheduler.

A module's ``configure_optimizers`` returns an :class:`OptimConfig`; the strategy builds megatron's optimizer
(fp32 main parameters, global-norm clipping across all model-parallel ranks, optionally the distributed optimizer)
over every model chunk, and megatron's ``OptimizerParamScheduler`` for warmup and decay; and the optimizer's state
as a checkpoint holds it (:func:`optimizer_sharded_state_dict`, :func:`load_optimizer_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Literal, Sequence

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lightning_megatron.errors import UserError

OPTIMIZER_SHARDING = "dp_reshardable"
"""How the distributed optimizer's state is sharded in a checkpoint: the sharding that saves and loads on
megatron-core 0.16.1 (it reshards over data parallelism only)."""


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
    fused: bool | None = None
    """Adam through torch's fused kernel (one launch per step) where megatron falls back to torch's multi-tensor
    AdamW (no Apex or Transformer Engine; Apex's and TE's Adam are fused already). ``None``: fused on GPUs, where it
    trained the 1.3B preset 3-4% faster on an H100 (docs/performance.md), multi-tensor on CPUs."""


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
    on_gpu = next(chunks[0].parameters()).is_cuda
    if config.fused or (config.fused is None and on_gpu):
        use_fused_adam(optimizer)
    return optimizer


def _parts(optimizer: Any) -> list[Any]:
    """megatron's optimizer as its parts (a ``ChainedOptimizer`` holds one per parameter kind)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's optimizer (one per chained part)."""
    return [part.optimizer for part in _parts(optimizer)]


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


def optimizer_sharded_state_dict(optimizer: Any, model_state: dict[str, Any], is_loading: bool = False) -> dict:
    """The sharded state of megatron's optimizer, its tensors keyed by the model parameters they belong to."""
    if is_loading:
        _init_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
    )


def _init_optimizer_state(optimizer: Any) -> None:
    """Give a fresh optimizer the state a loaded one will have: megatron's fallback to torch's Adam (no Apex/TE)
    creates moments without the ``step`` its distributed optimizer's ``state_dict`` requires."""
    for part in _parts(optimizer):
        if getattr(part, "init_state_fn", None) is not None:
            part.init_state_fn(part.optimizer, part.config)
        for group, param, state in _param_states(part.optimizer):
            if "exp_avg" in state:
                state.setdefault("step", torch.zeros((), dtype=torch.float32, device=_step_device(group, param)))


def _param_states(inner: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]]:
    """``(group, parameter, its state)`` of every parameter a torch optimizer holds state for."""
    for group in inner.param_groups:
        for param in group["params"]:
            if param in inner.state:
                yield group, param, inner.state[param]


def _step_device(group: dict[str, Any], param: torch.Tensor) -> torch.device:
    """Where torch's Adam expects a parameter's ``step``: on its device for the fused and capturable kernels."""
    return param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def load_optimizer_state(optimizer: Any, state: dict[str, Any] | None) -> None:
    """Restore megatron's optimizer from a loaded sharded state (``None``: refresh main params from the model)."""
    # In fp32 the main parameters are the model's own leaf tensors: copying into them needs no_grad.
    with torch.no_grad():
        if state is None:
            optimizer.reload_model_params()
            return
        parts = _parts(optimizer)
        # Loading replaces the groups' options with the saved ones; which kernel runs Adam is this run's choice.
        kernels = [[{key: group[key] for key in ("fused", "foreach") if key in group}
                    for group in part.optimizer.param_groups] for part in parts]
        optimizer.load_state_dict(state)
    part_states = [state] if len(parts) == 1 else [state[index] for index in range(len(parts))]
    for part, part_state, part_kernels in zip(parts, part_states, kernels):
        for group, kernel in zip(part.optimizer.param_groups, part_kernels):
            group.update(kernel)
        # With torch's Adam standing in for Apex/TE, megatron's distributed optimizer keeps the step count in its
        # param groups, then restores every parameter's ``step`` from the freshly initialised state (0) and shares
        # one tensor among them; give each parameter its own tensor holding the saved count, where its kernel wants it.
        groups = part_state.get("optimizer", {}).get("param_groups", []) if isinstance(part_state, dict) else []
        steps = {float(group["step"]) for group in groups if group.get("step") is not None}
        saved = steps.pop() if len(steps) == 1 else None
        for group, param, param_state in _param_states(part.optimizer):
            current = param_state.get("step")
            if isinstance(current, torch.Tensor):
                count = current.clone() if saved is None else torch.full_like(current, saved)
                param_state["step"] = count.to(dtype=torch.float32, device=_step_device(group, param))
