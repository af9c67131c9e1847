"""The contract between a LightningModule and :class:`~lightning_megatron.strategy.MegatronStrategy`.

A module subclasses :class:`MegatronModule` and implements three methods:

* :meth:`~MegatronModule.transformer_config` - its megatron ``TransformerConfig``, completed with the fields the
  strategy decides (parallel sizes, precision, recomputation);
* :meth:`~MegatronModule.build_stage` - the megatron-core model of one pipeline stage (``pre_process`` holds the
  embedding, ``post_process`` the output layer and loss; ``vp_stage`` is the virtual stage, or ``None``);
* :meth:`~MegatronModule.forward_step` - run one model chunk on one microbatch and return its output with a loss
  function mapping that output to ``(sum of token losses, number of tokens)``.

Everything else - splitting batches into microbatches, running megatron's pipeline schedule, reducing the loss over
microbatches and data-parallel ranks, the optimizer step - is the strategy's job. ``training_step`` and
``validation_step`` are provided and log ``train_loss`` / ``val_loss``; override them to log more. The module keeps
its architecture ``config`` (a dataclass) and ``optim`` as hyper-parameters; ``configure_optimizers`` returns
``optim``. Two options start a fine-tuning run: ``init_from`` (the weights of a checkpoint, loaded into the built
chunks with a fresh optimizer at step 0; see :mod:`lightning_megatron.pretrained`) and ``lora``
(:class:`~lightning_megatron.models.lora.LoRAConfig`: adapters on the linear layers, everything else frozen).
``predict_step`` hands each batch to the datamodule's ``predict(module, batch)``, so that a model does not
depend on how predictions are made (e.g. :class:`~lightning_megatron.generation.predict.PromptsDataModule`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron import parallel
from lightning_megatron.cadence import is_logging_step
from lightning_megatron.checkpoint import model_sharded_state_dict, restore_chunks
from lightning_megatron.models.lora import LoRAConfig, adapter_state, add_adapters
from lightning_megatron.optim import OptimConfig
from lightning_megatron.schedule import LossFn, StepResult, batch_size_of


class MegatronModule(pl.LightningModule, ABC):
    """Base class of LightningModules trained with megatron-core's parallelism."""

    def __init__(self, config: Any = None, optim: OptimConfig | None = None, lora: LoRAConfig | None = None,
                 init_from: str | None = None) -> None:
        super().__init__()
        self.config = config
        """The model's architecture, a dataclass saved with the hyper-parameters (``None`` if the module has none)."""
        self.optim = optim or OptimConfig()
        self.lora = lora
        """Adapters on the linear layers with the base weights frozen (``None``: every weight trains)."""
        self.init_from = init_from
        """A checkpoint whose weights the chunks start from (training, converted or consolidated; any layout)."""
        if config is not None:
            hparams = {"config": asdict(config), "optim": asdict(self.optim)}
            if lora is not None:
                hparams.update(lora=asdict(lora), init_from=init_from)
            self.save_hyperparameters(hparams)
        self.chunks: torch.nn.ModuleList | None = None
        self.collected_logits: list[torch.Tensor] | None = None
        """Set to a list to have ``forward_step`` append each microbatch's ``[batch, seq, vocab_size]`` logits,
        gathered over tensor parallelism, on the last pipeline stage (GPT, BERT and T5 honour it)."""

    @abstractmethod
    def transformer_config(self, **fields: Any) -> TransformerConfig:
        """The model's megatron ``TransformerConfig``, with ``fields`` (set by the strategy) applied on top."""

    @abstractmethod
    def build_stage(
        self, config: TransformerConfig, pre_process: bool, post_process: bool, vp_stage: int | None
    ) -> torch.nn.Module:
        """Build the megatron-core model of one (virtual) pipeline stage."""

    @abstractmethod
    def forward_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, LossFn]:
        """Run ``model`` (one chunk) on one microbatch; return its output and the loss function for it."""

    # Lightning's annotation lists torch optimizers; under the strategy this returns the config it builds one from.
    def configure_optimizers(self) -> OptimConfig:  # type: ignore[override]
        """The optimizer and learning-rate schedule (:attr:`optim`); the strategy builds megatron's optimizer."""
        return self.optim

    @property
    def megatron_config(self) -> TransformerConfig:
        """The ``TransformerConfig`` the chunks were built with (after :meth:`configure_model`)."""
        if self.chunks is None:
            raise RuntimeError("the model is not built yet; call configure_model() first")
        return parallel.unwrap(self.chunks[0]).config

    def configure_model(self) -> None:
        """Build this rank's model chunks with the strategy's fields and load :attr:`init_from` into them
        (idempotent); see :meth:`build`."""
        if self.chunks is None:
            self.build(self._strategy_fields())
            if self.init_from:
                from lightning_megatron.pretrained import load_pretrained

                load_pretrained(self, self.init_from)

    def build(self, fields: Mapping[str, Any]) -> None:
        """Build this rank's model chunks from ``transformer_config(**fields)`` (with :attr:`lora`'s adapters): the
        one way chunks are built, by the strategy (:meth:`configure_model`) and outside a Trainer
        (``convert.build_module``). megatron's parallel state must be initialised."""
        config = self.transformer_config(**fields)
        self.chunks = torch.nn.ModuleList(
            parallel.build_chunks(lambda pre, post, vp: self.build_stage(config, pre, post, vp))
        )
        if self.lora is not None:
            for chunk in self.chunks:
                add_adapters(chunk, self.lora, self.config.seed, config.gated_linear_unit)

    def checkpoint_state_dict(self) -> dict[str, Any]:
        """The sharded model state a checkpoint holds (:func:`~lightning_megatron.checkpoint.model_sharded_state_dict`),
        only the adapters' when :attr:`lora` says ``adapters_only``."""
        if self.chunks is None:
            raise RuntimeError("the model is not built yet; call configure_model() first")
        state = model_sharded_state_dict(self.chunks)
        if self.lora is not None and self.lora.adapters_only:
            state = {name: adapter_state(chunk_state) for name, chunk_state in state.items()}
        return state

    def load_checkpoint_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`checkpoint_state_dict` saved (loaded back as tensors) into the chunks."""
        assert self.chunks is not None
        # An adapters-only checkpoint leaves the base weights as init_from loaded them.
        restore_chunks(self.chunks, state, strict=self.strict_loading and not (self.lora and self.lora.adapters_only))

    def sequence_length(self, batch: Mapping[str, torch.Tensor]) -> int:
        """The sequence length of a batch, which sizes the tensors sent between pipeline stages."""
        return batch["tokens"].shape[1]

    def optimizer_zero_grad(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the strategy zeroes megatron's gradient buffers before each step's schedule."""

    def _strategy_fields(self) -> dict[str, Any]:
        strategy = self._trainer.strategy if self._trainer is not None else None
        fields = getattr(strategy, "transformer_fields", None)
        return fields() if callable(fields) else {}

    def _run(self, batch: Mapping[str, torch.Tensor], forward_only: bool) -> StepResult:
        return self.trainer.strategy.run_step(self, batch, forward_only=forward_only)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Forward and backward over all microbatches of ``batch``; logs ``train_loss`` every step and the learning
        rate on logging steps (:func:`~lightning_megatron.cadence.is_logging_step`).

        Nothing is read back from the device here: the loss is logged as a device tensor that loggers read once per
        logging interval (not as a progress-bar metric, which Lightning reads back after every step;
        :class:`~lightning_megatron.callbacks.MegatronProgressBar` reads it on logging steps), and the learning rate
        as a CPU tensor (a Python number would be copied to the device, which waits for the step)."""
        result = self._run(batch, forward_only=False)
        size = batch_size_of(batch)
        loss = result.loss
        self.log("train_loss", loss, batch_size=size)
        if self.trainer.optimizers and is_logging_step(self.trainer):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("lr", torch.tensor(lr), prog_bar=True, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """On logging steps, log the global gradient norm megatron's optimizer computed (a device tensor, not read
        back here), and fp16's loss scale and skipped steps."""
        precision = getattr(self.trainer.strategy, "precision_plugin", None)
        if precision is None or not hasattr(precision, "last_grad_norm") or not is_logging_step(self.trainer):
            return
        grad_norm = precision.last_grad_norm
        if grad_norm is not None:
            self.log("grad_norm", grad_norm, batch_size=1)
        if precision.precision == "16-mixed":
            # CPU tensors: Lightning reads progress-bar metrics back after every step, logged in it or not.
            optimizer = self.trainer.strategy.optimizers[0]
            self.log("loss_scale", torch.tensor(float(optimizer.get_loss_scale())), batch_size=1)
            self.log("skipped_steps", torch.tensor(float(precision.skipped_steps)), prog_bar=True, batch_size=1)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss without backward; logs ``val_loss`` (per-token mean over the batch) and ``val_ppl``."""
        return self._log_eval(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Like :meth:`validation_step`, logging ``test_loss`` and ``test_ppl``."""
        return self._log_eval(batch, "test")

    def _log_eval(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        result = self._run(batch, forward_only=True)
        loss, tokens = result.loss, result.num_tokens
        # Weighting each batch by its token count makes the epoch mean the per-token loss over the whole split.
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=tokens)
        self.log(f"{stage}_ppl", math.exp(min(loss.item(), 50.0)), batch_size=tokens)
        return loss

    def predict_step(self, batch: Any, batch_idx: int = 0) -> Any:
        """What the datamodule's ``predict(module, batch)`` makes of ``batch`` (e.g. completions of prompts)."""
        predict = getattr(self.trainer.datamodule, "predict", None)
        if predict is None:
            raise TypeError(
                f"trainer.predict with a {type(self).__name__} needs a datamodule with a predict(module, batch) method, "
                f"e.g. lightning_megatron.generation.predict.PromptsDataModule"
            )
        return predict(self, batch)

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        """Advance megatron's scheduler by one optimizer step."""
        scheduler.step(increment=1)
