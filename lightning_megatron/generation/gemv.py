"""One-token matrix-vector products on CUDA: a Triton kernel that spreads a layer's rows over every SM.

At batch 1 a decode step reads each weight once, so its speed is the rate at which the weights are read. cuBLAS
tiles the output in blocks of 64 rows: the 1.3B preset's 2048-row attention projection runs on 32 of an H200's 132
SMs and reads its weight at ~0.8 TB/s (docs/performance.md). Here each program takes a few rows and all of K, so
every SM streams weights; int8 weights are dequantized in registers and their row scales applied to the sums.
Our own kernel because torch's CUDA matmuls keep the 64-row tiles and ``torch._weight_int8pack_mm`` decoded at
0.13x of bf16 there; the CPU and batches of more than one row keep torch's matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_megatron.backends import HAVE_TRITON


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`gemv` runs ``x @ weight.T`` (one row of input, CUDA, Triton present, contiguous weight)."""
    rows = x.numel() // x.shape[-1]
    return (HAVE_TRITON and x.is_cuda and rows == 1 and weight.is_contiguous() and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and weight.shape[1] % 128 == 0)


def gemv(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)`` for one row ``x`` (``[..., K]``, one row in all) and ``weight`` ``[N, K]``
    (bf16/fp16/fp32, or int8 with ``scale`` ``[N]`` per row); the result has ``x``'s shape with ``N`` last, in
    ``x``'s dtype. The bias is added in the kernel: a separate add would be one more launch per layer."""
    build()
    n, k = weight.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_k = next(size for size in (512, 256, 128) if k % size == 0)
    _matvec[lambda meta: (triton_cdiv(n, meta["BLOCK_N"]),)](
        x.reshape(k).contiguous(), weight, scale if scale is not None else out, bias if bias is not None else out, out,
        n, k, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_K=block_k)
    return out.reshape(*x.shape[:-1], n)


def triton_cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` (the launch grid)."""
    return -(-a // b)


_matvec: Any = None
"""The Triton kernel (autotuned per weight shape), once :func:`build` made it."""


def build() -> None:
    """Make the kernel (once). Call it before ``torch.compile`` traces :func:`gemv`, so that tracing sees a Triton
    kernel rather than the code that makes one."""
    global _matvec
    if _matvec is None:
        _matvec = _make_kernel()


def _make_kernel() -> Any:  # built on first use, so that the package imports without Triton
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n}, num_warps=w) for n in (2, 4, 8, 16) for w in (2, 4, 8)]

    @triton.autotune(configs=configs, key=["N", "K"])
    @triton.jit
    def matvec(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, N, K, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        live = rows < N
        # Products accumulate per column and are summed once at the end: one reduction per program, not per tile.
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            w = tl.load(w_ptr + rows[:, None] * K + (start + cols)[None, :], mask=live[:, None], other=0)
            x = tl.load(x_ptr + start + cols)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_SCALE:
            out = out * tl.load(s_ptr + rows, mask=live, other=0).to(tl.float32)
        if HAS_BIAS:
            out = out + tl.load(b_ptr + rows, mask=live, other=0).to(tl.float32)
        tl.store(o_ptr + rows, out.to(o_ptr.dtype.element_ty), mask=live)

    return matvec
