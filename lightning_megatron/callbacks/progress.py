"""A progress bar that shows what a megatron run is judged by, readably: loss, lr, tokens/s, MFU, ETA."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


def format_metric(name: str, value: float) -> str:
    """Learning rates in scientific notation, rates as integers, fractions as percentages, losses to 4 digits."""
    if name == "lr" or name.endswith("_lr"):
        return f"{value:.2e}"
    if name.endswith("_per_s"):
        return f"{value:,.0f}"
    if name == "mfu":
        return f"{value:.1%}"
    return f"{value:.4g}"


class MegatronProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar (elapsed, ETA, it/s) with the megatron run's metrics formatted for reading."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {name: format_metric(name, value) if isinstance(value, (int, float)) else value
                for name, value in metrics.items()}
