"""int8 weight-only quantization of a built model's linear layers, for inference.

Every tensor-parallel linear layer (megatron's ``ColumnParallelLinear``/``RowParallelLinear``: attention QKV and
output projections, the MLP, an untied output layer) keeps its weight as int8 with one scale per output row
(symmetric: ``scale = max |row| / 127``) and computes ``(x @ W_int8^T) * scale``; activations, norms, biases and
embeddings stay in the model's dtype. Under tensor parallelism each rank quantizes its own shard (a row-parallel
shard gets the scales of its part of each row; the partial products are scaled before they are summed).

The matmul is ``torch._weight_int8pack_mm`` (the int8 weight is read as is) on the CPU. On GPUs a one-row input
(a batch-1 decode step) goes through :func:`~lightning_megatron.generation.gemv.gemv`, which reads the int8 weight
and dequantizes it in registers; larger inputs (and devices without that kernel or ``_weight_int8pack_mm``) cast the
weight to the activations' dtype inside the matmul and apply the scale after, which ``torch.compile``
(``build_engine(..., compile=True)``) fuses into one kernel. Which one a layer uses is decided once, when it is
quantized (:attr:`Int8Linear.int8_kernel`), so forwards stay free of host syncs and replay from CUDA graphs. Our own
layer swap because megatron-core quantizes only through Transformer Engine's fp8/fp4 recipes or NVIDIA ModelOpt,
and torchao's ``quantize_`` targets ``torch.nn.Linear``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

from lightning_megatron.generation import gemv
from lightning_megatron.models.layers import BiasInGemmColumnParallelLinear
from lightning_megatron.parallel import unwrap

MODES = ("int8",)
"""The accepted values of ``quantize``."""

INT8PACK = "weight_int8pack_mm"
DEQUANTIZE = "dequantize-matmul"
GEMV = "triton-gemv"
"""One-row inputs through :mod:`.gemv`, others as :data:`DEQUANTIZE`."""


def int8_matmul(x: Tensor, weight: Tensor, scale: Tensor, kernel: str, bias: Tensor | None = None) -> Tensor:
    """``x @ (weight * scale[:, None])^T (+ bias)`` for an int8 ``weight`` ``[out, in]`` and ``scale`` ``[out]`` in
    x's dtype."""
    if kernel == GEMV and gemv.usable(x, weight):
        return gemv.gemv(x, weight, scale, bias)
    rows = x.reshape(-1, x.shape[-1])
    if kernel == INT8PACK:
        out = torch._weight_int8pack_mm(rows, weight, scale)
    else:
        out = (rows @ weight.to(x.dtype).t()) * scale
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class Int8Linear:
    """Mixed into megatron's parallel linear layers: ``weight`` is an int8 buffer, ``weight_scale`` its row scales."""

    weight: Tensor
    weight_scale: Tensor
    int8_kernel: str
    """``weight_int8pack_mm``, ``triton-gemv`` or ``dequantize-matmul`` (see the module's docstring)."""

    def _forward_impl(self, input: Tensor, weight: Tensor, bias: Tensor | None = None, *args: Any,
                      sequence_parallel: bool = False, tp_group: Any = None, **kwargs: Any) -> Tensor:
        if sequence_parallel:  # what megatron's own matmul does first under sequence parallelism
            input = gather_from_sequence_parallel_region(input, group=tp_group)
        return int8_matmul(input, weight, self.weight_scale, self.int8_kernel, bias)


class Int8ColumnParallelLinear(Int8Linear, ColumnParallelLinear):
    """A ``ColumnParallelLinear`` with an int8 weight."""


class Int8RowParallelLinear(Int8Linear, RowParallelLinear):
    """A ``RowParallelLinear`` with an int8 weight."""


_QUANTIZED = {ColumnParallelLinear: Int8ColumnParallelLinear, BiasInGemmColumnParallelLinear: Int8ColumnParallelLinear,
              RowParallelLinear: Int8RowParallelLinear}


def _kernel(weight: Tensor, scale: Tensor) -> str:
    """``weight_int8pack_mm`` if this device's torch runs it for this layer, else ``triton-gemv`` on CUDA with
    Triton, else ``dequantize-matmul``."""
    if weight.is_cuda:  # torch's CUDA kernel decoded a 1.3B model 7.7x slower than bf16 at batch 1 (H200)
        return GEMV if gemv.HAVE_TRITON else DEQUANTIZE
    probe = torch.ones(2, weight.shape[1], dtype=scale.dtype, device=weight.device)
    try:
        torch._weight_int8pack_mm(probe, weight, scale)
    except (RuntimeError, NotImplementedError):
        return DEQUANTIZE
    return INT8PACK


@torch.no_grad()
def _quantize_layer(layer: ColumnParallelLinear | RowParallelLinear) -> None:
    weight = layer.weight.detach()
    peak = weight.abs().amax(dim=1).float()
    # Scales in the activations' dtype (torch's int8 matmul takes them so); rows are rounded with the stored scale.
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak)).to(weight.dtype)
    quantized = torch.round(weight.float() / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    # Free the float weight now: megatron's DDP wrapper (which the Trainer puts around the chunks, in predict too)
    # keeps a reference to the parameter.
    layer.weight.data = weight.new_empty(0)
    del layer.weight
    layer.register_buffer("weight", quantized)
    layer.register_buffer("weight_scale", scale)
    layer.__class__ = _QUANTIZED[type(layer)]
    layer.int8_kernel = _kernel(quantized, scale)


def quantize(model: Any, mode: str = "int8") -> None:
    """Store the linear weights of a built model (a module with ``chunks``, or the chunks) as int8, in place.

    For inference only: the quantized layers have no trainable weights. Tied output layers stay as they are (they
    are the word embeddings). Quantizing twice changes nothing.
    """
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported; accepted: {', '.join(map(repr, MODES))}")
    chunks: Iterable[torch.nn.Module] | None = getattr(model, "chunks", model)
    if chunks is None:
        raise RuntimeError("the model is not built yet: quantize it after configure_model()")
    for chunk in chunks:
        for layer in unwrap(chunk).modules():
            weight = getattr(layer, "weight", None)
            if (type(layer) in _QUANTIZED and isinstance(weight, torch.nn.Parameter)
                    and not getattr(weight, "shared_embedding", False)):
                _quantize_layer(layer)
