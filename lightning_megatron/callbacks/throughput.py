"""Throughput: tokens/s, TFLOP/s per device, MFU and peak memory, on the progress bar and every logger, once per
logging interval.

FLOPs per token follow Megatron-LM's accounting (Narayanan et al. 2021, appendix), generalised to grouped-query
attention and gated MLPs, with the causal-attention halving: for each layer, forward
``2h(h_q + 2h_kv) + 2h·h_q + 2·m·h·f + 2·s·h_q`` FLOPs per token (QKV, output projection, MLP with ``m`` = 3 for
gated / 2 otherwise, causal attention scores and values over ``s/2`` keys on average), plus ``2hV`` for the logits;
training is 3x forward (backward counts twice), plus one more forward of the recomputed layers with full recompute.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_megatron.cadence import is_logging_step

_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
"""Dense bf16 tensor-core peak per GPU (vendor datasheets, SXM parts)."""


def gpt_flops_per_token(
    num_layers: int,
    hidden_size: int,
    seq_length: int,
    vocab_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
    gated_mlp: bool = False,
    recompute_layers: int = 0,
) -> float:
    """Training FLOPs per token of a GPT (forward + backward, plus recomputation of ``recompute_layers`` layers)."""
    h = hidden_size
    head_dim = h // num_attention_heads
    h_kv = (num_query_groups or num_attention_heads) * head_dim
    f = ffn_hidden_size or 4 * h
    layer = 2 * h * (h + 2 * h_kv) + 2 * h * h + (3 if gated_mlp else 2) * 2 * h * f + 2 * seq_length * h
    return 3.0 * (num_layers * layer + 2 * h * vocab_size) + recompute_layers * layer


def peak_tflops(device: torch.device) -> float | None:
    """The bf16 dense peak of ``device`` if it is a known GPU, else ``None`` (no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16_TFLOPS.items() if key in name), None)


class Throughput(pl.Callback):
    """Logs ``tokens_per_s`` (global), ``tflops`` per device, ``mfu`` and ``peak_mem_gb`` on logging steps.

    Each value averages the steps since the previous logging step (see :mod:`lightning_megatron.cadence`), timed
    between two synchronisations with the device: the steps in between run without waiting for it, and the values
    are logged as CPU tensors, which Lightning's progress bar reads without waiting for the device either. Tokens per
    step are counted from the batch (``tokens``, or T5's encoder and decoder tokens, × data-parallel size); FLOPs per
    token come from :func:`gpt_flops_per_token` when the module is a :class:`~lightning_megatron.GPT`. Validation
    during fit is not training time: the clock stops while it runs.
    """

    def __init__(self, peak_tflops_per_device: float | None = None) -> None:
        self.peak = peak_tflops_per_device
        self._since = 0.0
        self._tokens = 0
        self._flops_per_token: float | None = None
        self._paused: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flops_per_token = _module_flops_per_token(pl_module)
        if self.peak is None:
            self.peak = peak_tflops(trainer.strategy.root_device)
        self._since = time.perf_counter()
        self._tokens = 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside a fit run, not `validate`
            self._paused = _synchronized_clock(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._paused is not None:
            self._since += _synchronized_clock(trainer) - self._paused
            self._paused = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += _batch_tokens(batch) * getattr(trainer.strategy, "data_parallel_size", trainer.world_size)
        if not is_logging_step(trainer):
            return
        cuda = trainer.strategy.root_device.type == "cuda"
        now = _synchronized_clock(trainer)
        elapsed, tokens = now - self._since, self._tokens
        self._since, self._tokens = now, 0
        if elapsed <= 0:
            return
        tokens_per_s = tokens / elapsed
        metrics = {"tokens_per_s": tokens_per_s}
        if self._flops_per_token is not None:
            tflops = tokens_per_s * self._flops_per_token / trainer.world_size / 1e12
            metrics["tflops"] = tflops
            if self.peak:
                metrics["mfu"] = tflops / self.peak
        if cuda:
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        pl_module.log_dict({name: torch.tensor(value) for name, value in metrics.items()}, prog_bar=True,
                           on_step=True, on_epoch=False, batch_size=1)


def _synchronized_clock(trainer: pl.Trainer) -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _batch_tokens(batch: Any) -> int:
    """Token ids of a batch: a decoder's or encoder's ``tokens``, or an encoder-decoder's inputs and targets."""
    if "tokens" in batch:
        return batch["tokens"].numel()
    return sum(batch[key].numel() for key in ("enc_tokens", "dec_tokens") if key in batch)


def _module_flops_per_token(module: pl.LightningModule) -> float | None:
    from lightning_megatron.models.gpt import GPT

    if not isinstance(module, GPT):
        return None
    c = module.config
    config = module.megatron_config
    recompute = config.num_layers if config.recompute_granularity == "full" else 0
    return gpt_flops_per_token(
        c.num_layers, c.hidden_size, c.seq_length, c.padded_vocab_size(config.tensor_model_parallel_size),
        c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size, c.activation == "swiglu", recompute,
    )
