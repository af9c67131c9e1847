"""MegatronPrecision: Lightning's precision plugin for megatron-core's mixed precision.

megatron-core does mixed precision itself: the model is cast by ``Float16Module`` (bf16/fp16 parameters and
activations), the optimizer keeps fp32 main parameters, and for fp16 a dynamic loss scaler scales the loss inside
the pipeline schedule and skips steps whose gradients overflow. This plugin translates Lightning's precision
string into those settings and runs the optimizer step the way megatron's optimizer expects (no closure).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from typing_extensions import override

from lightning_megatron.backends import HAVE_TE
from lightning_megatron.errors import UserError

PrecisionName = Literal["32-true", "bf16-mixed", "16-mixed", "fp8-mixed"]
_ALIASES = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
            "16": "16-mixed", "16-mixed": "16-mixed", "fp8": "fp8-mixed", "fp8-mixed": "fp8-mixed"}


class MegatronPrecision(Precision):
    """Mixed precision through megatron-core: ``32-true``, ``bf16-mixed``, ``16-mixed`` (dynamic loss scaling) or
    ``fp8-mixed`` (bf16 with fp8 matmuls through Transformer Engine)."""

    def __init__(
        self,
        precision: str = "32-true",
        initial_loss_scale: float = 2.0**16,
        min_loss_scale: float = 1.0,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
    ) -> None:
        name = _ALIASES.get(str(precision))
        if name is None:
            raise UserError(
                f"precision={precision!r} is not supported by the megatron strategy; use one of "
                f"'32-true', 'bf16-mixed', '16-mixed' or 'fp8-mixed'"
            )
        if name == "fp8-mixed" and not HAVE_TE:
            raise UserError("precision='fp8-mixed' needs Transformer Engine; install it or use 'bf16-mixed'")
        self.precision = name  # type: ignore[assignment]
        self.initial_loss_scale = initial_loss_scale
        self.min_loss_scale = min_loss_scale
        self.loss_scale_window = loss_scale_window
        self.hysteresis = hysteresis
        self.skipped_steps = 0
        self._grad_norm: torch.Tensor | float | None = None

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last step (a 0-dim float32 tensor on the device; ``None`` without
        clipping), cast when asked for rather than in every step."""
        return None if self._grad_norm is None else torch.as_tensor(self._grad_norm, dtype=torch.float32)

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype of the model's parameters and activations."""
        return {"32-true": torch.float32, "16-mixed": torch.float16}.get(self.precision, torch.bfloat16)

    def transformer_fields(self) -> dict[str, Any]:
        """The fields of megatron's ``TransformerConfig`` that the precision determines."""
        fields: dict[str, Any] = {
            "fp16": self.precision == "16-mixed",
            "bf16": self.precision in ("bf16-mixed", "fp8-mixed"),
            "params_dtype": self.params_dtype,
            "pipeline_dtype": self.params_dtype,
        }
        if self.precision == "fp8-mixed":
            fields.update(fp8="hybrid", fp8_recipe="delayed")
        return fields

    def optimizer_fields(self) -> dict[str, Any]:
        """The fields of megatron's ``OptimizerConfig`` that the precision determines."""
        return {
            "fp16": self.precision == "16-mixed",
            "bf16": self.precision in ("bf16-mixed", "fp8-mixed"),
            "params_dtype": self.params_dtype,
            "initial_loss_scale": self.initial_loss_scale,
            "min_loss_scale": self.min_loss_scale,
            "loss_scale_window": self.loss_scale_window,
            "hysteresis": self.hysteresis,
        }

    @override
    def backward(self, tensor: torch.Tensor, model: "pl.LightningModule", optimizer: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: megatron's schedule already ran the backward pass inside the training step."""

    @override
    def clip_gradients(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: megatron's optimizer clips by the global norm over all model-parallel ranks."""

    @override
    def optimizer_step(self, optimizer: Any, model: "pl.LightningModule", closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Run the closure (forward and backward over all microbatches), then megatron's ``optimizer.step()``."""
        closure_result = closure()
        self._after_closure(model, optimizer)
        succeeded, self._grad_norm, _ = optimizer.step()
        if not succeeded:
            self.skipped_steps += 1
        return closure_result

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


def to_megatron_precision(plugin: Any) -> MegatronPrecision:
    """Turn Lightning's plain precision plugins (``precision="bf16-mixed"`` etc.) into :class:`MegatronPrecision`."""
    if isinstance(plugin, MegatronPrecision):
        return plugin
    # Lightning's own plugins for plain, mixed and half precision only: others (FSDP, DeepSpeed, bitsandbytes, TE)
    # subclass Precision with behaviour megatron's optimizer would not honour.
    if isinstance(plugin, (MixedPrecision, HalfPrecision)) or type(plugin) is Precision:
        return MegatronPrecision(str(plugin.precision))
    raise UserError(
        f"the megatron strategy cannot honour the precision plugin {type(plugin).__name__}; pass "
        f"precision='32-true', 'bf16-mixed', '16-mixed' or 'fp8-mixed', or a lightning_megatron.MegatronPrecision"
    )
