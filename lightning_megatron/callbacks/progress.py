"""A progress bar that shows what a megatron run is judged by, readably: loss, lr, tokens/s, MFU, ETA."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_megatron.cadence import is_logging_step


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
    """Lightning's TQDM bar (elapsed, ETA, it/s) with the megatron run's metrics formatted for reading.

    With ``max_steps`` set, one bar counts optimizer steps to ``max_steps`` across epochs (a resumed run starts at
    its step), so its ETA is the run's; the description still names the epoch. ``train_loss`` is logged without
    ``prog_bar`` (Lightning would read a progress-bar metric back from the GPU after every step); this bar shows it
    anyway, reading it back on logging steps only (:mod:`lightning_megatron.cadence`) and showing the last value
    read in between, so that the bar never makes the host wait for a step.
    """

    read_at_refresh: tuple[str, ...] = ("train_loss",)
    """Logged metrics the bar shows although they are not progress-bar metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_read: dict[str, float] = {}

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        logged = trainer.callback_metrics
        if not (trainer.training and self._last_read) or is_logging_step(trainer):
            self._last_read = {name: float(logged[name]) for name in self.read_at_refresh if name in logged}
        metrics = dict(self._last_read)
        metrics.update(super().get_metrics(trainer, pl_module))
        metrics.pop("v_num", None)
        return {name: format_metric(name, value) if isinstance(value, (int, float)) else value
                for name, value in metrics.items()}

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if trainer.max_steps >= 0:  # a run resumed mid-epoch starts here, without an epoch start
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # the rate and ETA count this run's steps only
            bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.max_steps < 0:
            super().on_train_epoch_start(trainer, *args)
            return
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps < 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, trainer.max_steps):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
