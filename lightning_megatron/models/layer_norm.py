"""LayerNorm on CUDA in two Triton kernels, for GPUs without Transformer Engine or Apex (whose fused norms megatron
uses when it has them).

torch's LayerNorm backward runs at about a third of an H100's memory bandwidth on the 1.3B preset's rows (16,384
rows of 2,048): 168 us a call, 16 ms of its 521 ms step (``benchmarks/profile_step.py``). Here the forward reads each
row once and writes the output with the row's mean and reciprocal standard deviation; the backward reads the input
and the output gradient once, writes the input gradient, and sums the weight and bias gradients over the rows each
program takes, in registers, leaving one small sum over programs (no atomics, so runs are deterministic). Each
backward program takes a tile of rows at a time (4,096 values) and there are two programs per multiprocessor: the
fastest of 36 tilings timed on an H100 for both GPT-2 widths (``benchmarks/data/h100_layer_norm.jsonl``). Our own
because torch's kernels are the ones being replaced and ``torch.compile``'s LayerNorm measured slower still
(``docs/performance.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from lightning_megatron.backends import HAVE_TRITON

TILE = 4096
"""Values a backward program holds per iteration: rows of up to 4,096 values one at a time, narrower rows several."""

MAX_WIDTH = 16384
"""Widest row the kernels take (a whole row lives in one program's registers); wider rows keep torch's LayerNorm."""


def usable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`layer_norm` runs: CUDA, Triton present, a bias, rows no wider than :data:`MAX_WIDTH`."""
    return (HAVE_TRITON and x.is_cuda and bias is not None and 0 < x.numel() and x.shape[-1] <= MAX_WIDTH
            and x.dtype == weight.dtype == bias.dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.layer_norm`` over the last dimension of ``x`` (see :func:`usable` for where it runs)."""
    return _LayerNorm.apply(x, weight, bias, eps)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        forward_kernel, _ = _kernels()
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        count, width = rows.shape
        out = torch.empty_like(rows)
        mean = torch.empty(count, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, warps = _block(width)
        forward_kernel[(count,)](rows, weight, bias, out, mean, rstd, width, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        _, backward_kernel = _kernels()
        rows, weight, mean, rstd = ctx.saved_tensors
        count, width = rows.shape
        grad = grad.reshape(count, width).contiguous()
        grad_input = torch.empty_like(rows)
        block, warps = _block(width)
        tile = max(TILE // block, 1)
        programs = min(math.ceil(count / tile), 2 * _multiprocessors(rows.device))
        partial_weight = torch.empty(programs, width, dtype=torch.float32, device=rows.device)
        partial_bias = torch.empty_like(partial_weight)
        backward_kernel[(programs,)](grad, rows, weight, mean, rstd, grad_input, partial_weight, partial_bias, count,
                                     width, math.ceil(count / (tile * programs)), BLOCK=block, ROWS=tile,
                                     num_warps=warps)
        return (grad_input.view(ctx.shape), partial_weight.sum(0).to(weight.dtype),
                partial_bias.sum(0).to(weight.dtype), None)


def _block(width: int) -> tuple[int, int]:
    """The power-of-two block a row fits in, and warps enough to hold it in registers (8 values of a row a thread)."""
    block = 1 << (width - 1).bit_length()
    return block, min(max(block // 256, 1), 16)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:  # built on first use, so that the package imports without Triton
    import triton
    import triton.language as tl

    @triton.jit
    def forward(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < width
        x = tl.load(x_ptr + row * width + cols, mask=live, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(live, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def backward(grad_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_w_ptr, grad_b_ptr, count, width, tiles,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr):
        program = tl.program_id(0)
        stride = tl.num_programs(0) * ROWS
        cols = tl.arange(0, BLOCK)
        live = cols < width
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)[None, :]
        grad_w = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        grad_b = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        # Program p takes the tiles of ROWS rows that start at p * ROWS, then every `stride` rows after, so the weight
        # and bias gradients stay in registers until the end.
        for tile in range(0, tiles):
            rows = program * ROWS + tile * stride + tl.arange(0, ROWS)
            live_rows = rows < count
            mask = live_rows[:, None] & live[None, :]
            offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=live_rows, other=0.0)[:, None]
            rstd = tl.load(rstd_ptr + rows, mask=live_rows, other=0.0)[:, None]
            normed = tl.where(mask, (x - mean) * rstd, 0.0)
            scaled = w * dy
            dx = (scaled - normed * (tl.sum(normed * scaled, axis=1) / width)[:, None]
                  - (tl.sum(scaled, axis=1) / width)[:, None]) * rstd
            tl.store(grad_x_ptr + offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
            grad_w += dy * normed
            grad_b += dy
        tl.store(grad_w_ptr + program * width + cols, tl.sum(grad_w, axis=0), mask=live)
        tl.store(grad_b_ptr + program * width + cols, tl.sum(grad_b, axis=0), mask=live)

    return forward, backward


class FusedLayerNorm(torch.nn.LayerNorm):
    """torch's ``LayerNorm`` (same parameters and state dict) that trains with :func:`layer_norm` where it is
    :func:`usable`; CPUs keep the exact unfused math, and evaluation and generation keep torch's kernel (decoding
    is host-bound, and its compiled step then traces no Triton launch)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and usable(x, self.weight, self.bias):
            return layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)
