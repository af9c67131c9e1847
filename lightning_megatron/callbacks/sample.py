"""SampleText: show what the model writes, at the end of training (and every few validations if asked)."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_megatron.errors import UserError, one_line
from lightning_megatron.generation import SamplingParams, generate

_log = logging.getLogger(__name__)


class SampleText(pl.Callback):
    """Generate from ``prompt`` with the model being trained; rank 0 prints ``Sample: <text>`` and logs it.

    Works under every layout the megatron strategy runs (TP, PP, DP): all ranks generate together. The tokenizer is
    the datamodule's (``trainer.datamodule.tokenizer``). Sampling is seeded, so runs are comparable.
    """

    def __init__(
        self,
        prompt: str = "In the beginning",
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 1234,
        every_n_val: int = 0,
    ) -> None:
        """``every_n_val`` > 0 also samples after every n-th validation run; 0 samples only at the end of fit."""
        super().__init__()
        self.prompt = prompt
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed)
        self.params.validate()
        self.every_n_val = every_n_val
        self._validations = 0
        self.samples: list[tuple[int, str]] = []
        """``(global step, text)`` of every sample taken (on every rank)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_val:
            return
        self._validations += 1
        if self._validations % self.every_n_val == 0:
            self._sample_or_warn(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sample_or_warn(trainer, pl_module)

    def _sample_or_warn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A sample is a courtesy: whatever generation raises, the run it decorates still succeeds."""
        try:
            self.sample(trainer, pl_module)
        except Exception as error:  # noqa: BLE001 - see the docstring
            if trainer.is_global_zero:
                _log.warning(f"SampleText: no sample ({one_line(error)}); training is unaffected")

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """Generate now (collectively on all ranks) and report the text; returns it."""
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise UserError("SampleText needs a datamodule with a `tokenizer` attribute; use one such as "
                            "TextDataModule, or remove the callback")
        params = self.params
        room = pl_module.config.seq_length - len(tokenizer.encode(self.prompt))
        if params.max_new_tokens is not None and params.max_new_tokens > room:
            params = params.replace(max_new_tokens=room)
        text = generate(pl_module, self.prompt, params, tokenizer=tokenizer)[0].text or ""
        self.samples.append((trainer.global_step, text))
        rank_zero_info(f"Sample: {self.prompt}{text}")
        if trainer.is_global_zero:
            _log_text(trainer, f"{self.prompt}{text}")
        return text


def _log_text(trainer: pl.Trainer, text: str) -> None:
    """Log the sample as text to every logger that can store text (TensorBoard, W&B, MLflow)."""
    for logger in trainer.loggers:
        experiment: Any = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("sample", text, global_step=trainer.global_step)
        elif hasattr(logger, "log_text"):
            logger.log_text(key="sample", columns=["step", "text"], data=[[trainer.global_step, text]])
