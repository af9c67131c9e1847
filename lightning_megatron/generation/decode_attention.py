"""Attention of one decode step on CUDA: a Triton kernel that writes the step's key/value into the cache and attends.

A decode step's attention reads each row's cached keys once for one query per head. SDPA's flash kernel takes about
8 us for that on an H200 (1.3B preset, 256 keys: 2 MB), mostly set-up, and the cache writes before it are two more
kernels (docs/performance.md). Here one launch stores the new key/value at the step's cache position and attends:
programs per (row, head) and per span of keys ("splits", flash-decoding) so that a batch of one still spreads over
the SMs; with several splits, the last split of a (row, head) to finish merges the partial softmaxes (counted in
:attr:`.kv_cache.KVCache.counters`), so there is no second launch. The new key is taken from the input, not from the
cache (the cell being written is read by other programs but discarded). The mask is the cache's ``valid`` cells
(plus ALiBi's distance term from the cells' sequence positions), built in registers.
Our own because SDPA/FlexAttention have no fused cache write and were slower at one query (FlexAttention: 22 us).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_megatron.backends import HAVE_TRITON

BLOCK = 64
"""Keys per tile of the loop over the cache."""


def usable(device: torch.device, head_dims: set[int]) -> bool:
    """Whether :func:`attend_and_write` serves the decode steps of a model on ``device`` whose attention heads have
    ``head_dims`` (CUDA, Triton, one power-of-two head dim)."""
    return HAVE_TRITON and device.type == "cuda" and len(head_dims) == 1 and head_dims <= {16, 32, 64, 128, 256}


def preferred(batch: int, heads: int) -> bool:
    """Whether a decode step of ``batch`` rows and ``heads`` heads per row should use this kernel rather than SDPA:
    when the (row, head) pairs fill at most half the SMs, which is where splitting the keys pays (measured on the
    H100: 1.4-1.9x SDPA at batch 1, 0.76-0.89x at batch 8 and 64; docs/performance.md)."""
    build()
    return 2 * batch * heads <= _sms


def splits(programs: int, kv_length: int, sms: int) -> int:
    """How many spans of keys each (row, head) is split into: a power of two up to 16, enough to give ``sms`` two
    programs each, no span shorter than a tile."""
    count = 1
    while count < 16 and programs * count < 2 * sms and (2 * count - 1) * BLOCK < kv_length:
        count *= 2
    return count


def attend_and_write(query: Tensor, key: Tensor, value: Tensor, cache_keys: Tensor, cache_values: Tensor,
                     valid: Tensor, position: Tensor, kv_length: int, scale: float, slopes: Tensor | None = None,
                     cell_positions: Tensor | None = None, split_count: int | None = None,
                     counters: Tensor | None = None) -> Tensor:
    """Store ``key``/``value`` at cache cell ``position`` and attend; returns ``[1, batch, heads * dim]``.

    ``query`` is ``[1, batch, heads, dim]``, ``key``/``value`` ``[1, batch, groups, dim]``, ``cache_keys``/
    ``cache_values`` ``[batch, groups, cells, dim]`` (contiguous), ``valid`` ``[batch, cells]`` (the cells a row
    attends to), ``position`` ``[1]`` (long, on the device) and keys ``[0, kv_length)`` are read. With ALiBi,
    ``slopes`` ``[heads]`` and ``cell_positions`` ``[batch, cells]`` (each cell's sequence position).
    ``split_count``: spans of keys per (row, head), a power of two (default: :func:`splits` for this GPU).
    ``counters``: int32 zeros, at least ``batch * heads`` (left zero; default: new ones).
    """
    build()
    _, batch, heads, dim = query.shape
    groups = key.shape[2]
    query, key, value = query[0], key[0], value[0]
    out = torch.empty(batch, heads, dim, dtype=query.dtype, device=query.device)
    count = split_count or splits(batch * heads, kv_length, _sms)
    if count > 1:
        partial_max = torch.empty(batch * heads, count, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
        partial_out = torch.empty(batch * heads, count, dim, dtype=torch.float32, device=query.device)
        if counters is None:
            counters = torch.zeros(batch * heads, dtype=torch.int32, device=query.device)
    else:
        partial_max = partial_sum = partial_out = counters = out
    alibi = slopes is not None
    _attend[(batch * heads, count)](
        query, key, value, cache_keys, cache_values, valid, position, slopes if alibi else out,
        cell_positions if alibi else position, out, partial_max, partial_sum, partial_out, counters, kv_length,
        -(-kv_length // (count * BLOCK)) * BLOCK, scale, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), value.stride(0), value.stride(1), cache_keys.stride(0), cache_keys.stride(1),
        cache_keys.stride(2), valid.stride(0), cell_positions.stride(0) if alibi else 0,
        HEADS=heads, PER_GROUP=heads // groups, DIM=dim, BLOCK=BLOCK, SPLITS=count, ALIBI=alibi)
    return out.view(1, batch, heads * dim)


_attend: Any = None
_sms = 1
"""Streaming multiprocessors of the current GPU (read by :func:`build`; 1 without CUDA, e.g. Triton's interpreter)."""


def build() -> None:
    """Make the kernels (once); call it before ``torch.compile`` traces :func:`attend_and_write`."""
    global _attend, _sms
    if _attend is None:
        _attend = _make_kernel()
        if torch.cuda.is_available():
            _sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _make_kernel() -> Any:  # built on first use, so that the package imports without Triton
    import triton
    import triton.language as tl

    # Warps per program are tuned per shape (at the warm-up steps before a CUDA graph is captured); the kernel's
    # stores are the same whichever configuration writes them, and its counters end at zero either way.
    @triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)], key=["kv_length", "DIM", "SPLITS"])
    @triton.jit
    def attend(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, valid_ptr, pos_ptr, slope_ptr, cellpos_ptr, o_ptr, pm_ptr,
               ps_ptr, po_ptr, count_ptr, kv_length, span, scale, q_sb, q_sh, k_sb, k_sg, v_sb, v_sg, c_sr, c_sg,
               c_sl, valid_sr, cellpos_sr, HEADS: tl.constexpr, PER_GROUP: tl.constexpr, DIM: tl.constexpr,
               BLOCK: tl.constexpr, SPLITS: tl.constexpr, ALIBI: tl.constexpr):
        program = tl.program_id(0)
        split = tl.program_id(1)
        row = program // HEADS
        head = program % HEADS
        group = head // PER_GROUP
        dims = tl.arange(0, DIM)
        position = tl.load(pos_ptr)
        # Everything in float32: under torch.compile a float argument such as scale may arrive as float64.
        q = (tl.load(q_ptr + row * q_sb + head * q_sh + dims).to(tl.float32) * scale).to(tl.float32)
        cache = row * c_sr + group * c_sg
        if ALIBI:
            slope = tl.load(slope_ptr + head).to(tl.float32)
            query_position = tl.load(cellpos_ptr + row * cellpos_sr + position)
        # The new key/value: split 0 counts it (a query always sees itself); one head per group stores it.
        new_key = tl.load(k_ptr + row * k_sb + group * k_sg + dims)
        new_value = tl.load(v_ptr + row * v_sb + group * v_sg + dims)
        first_split = split == 0
        best = tl.where(first_split, tl.sum(q * new_key.to(tl.float32), axis=0), -1e30).to(tl.float32)
        total = tl.where(first_split, 1.0, 0.0).to(tl.float32)
        acc = tl.where(first_split, new_value.to(tl.float32), 0.0).to(tl.float32)
        stores = dims < tl.where(first_split & (head % PER_GROUP == 0), DIM, 0)
        tl.store(kc_ptr + cache + position * c_sl + dims, new_key.to(kc_ptr.dtype.element_ty), mask=stores)
        tl.store(vc_ptr + cache + position * c_sl + dims, new_value.to(vc_ptr.dtype.element_ty), mask=stores)
        start = split * span
        end = tl.minimum(start + span, kv_length)
        for first in range(start, end, BLOCK):
            cells = first + tl.arange(0, BLOCK)
            inside = cells < end
            # Keys are loaded whatever the mask says (in bounds; the cell being written is discarded below), so
            # their load does not wait for the mask's.
            valid = tl.load(valid_ptr + row * valid_sr + cells, mask=inside, other=0) != 0
            keys = tl.load(kc_ptr + cache + cells[:, None] * c_sl + dims[None, :], mask=inside[:, None], other=0)
            live = inside & valid & (cells != position)
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
            if ALIBI:
                key_positions = tl.load(cellpos_ptr + row * cellpos_sr + cells, mask=inside, other=0)
                scores += slope * (key_positions - query_position).to(tl.float32)
            scores = tl.where(live, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_best)
            correction = tl.exp(best - new_best)
            values = tl.load(vc_ptr + cache + cells[:, None] * c_sl + dims[None, :], mask=inside[:, None], other=0)
            acc = acc * correction + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
            total = total * correction + tl.sum(weights, axis=0)
            best = new_best
        if SPLITS == 1:
            tl.store(o_ptr + program * DIM + dims, (acc / total).to(o_ptr.dtype.element_ty))
        else:
            tl.store(pm_ptr + program * SPLITS + split, best)
            tl.store(ps_ptr + program * SPLITS + split, total)
            tl.store(po_ptr + (program * SPLITS + split) * DIM + dims, acc)
            # The last split of this (row, head) to finish merges the partial softmaxes (no second launch); the
            # counter's acquire-release add makes the other splits' partials visible to it.
            if tl.atomic_add(count_ptr + program, 1) == SPLITS - 1:
                parts = tl.arange(0, SPLITS)
                maxima = tl.load(pm_ptr + program * SPLITS + parts, cache_modifier=".cg")
                weights = tl.exp(maxima - tl.max(maxima, axis=0))
                total = tl.sum(tl.load(ps_ptr + program * SPLITS + parts, cache_modifier=".cg") * weights, axis=0)
                partials = tl.load(po_ptr + (program * SPLITS + parts[:, None]) * DIM + dims[None, :],
                                   cache_modifier=".cg")
                out = tl.sum(partials * weights[:, None], axis=0) / total
                tl.store(o_ptr + program * DIM + dims, out.to(o_ptr.dtype.element_ty))
                tl.atomic_xchg(count_ptr + program, 0)

    return attend
