"""The key/value cache of generation, and the core attention that writes and reads it.

:class:`KVCache` holds, per attention layer, keys and values as ``[rows, groups, positions, head_dim]``: one row
("slot") per running sequence, one column per cache position. A forward writes its new keys and values at the cache
positions the engine chooses (during a decode step every running row writes at the same position, the engine's
clock) and attends over positions ``[0, kv_length)`` through an additive mask built from ``valid``, which marks the
positions of a row that hold that row's own tokens. Rows that joined late, rows reordered by beam search and padding
therefore never see each other's keys, wherever they sit in the cache.

:class:`CachedAttention` takes the place of each layer's ``core_attention`` while generating (core attention holds no
weights): ``F.scaled_dot_product_attention`` over the cache, or, without a cache, over the forward's own keys (the
recompute reference and scoring); decode steps on CUDA write and attend in one kernel (:mod:`.decode_attention`). With grouped-query attention the query heads of a group are folded into the query
axis instead of repeating keys, so a decode step reads every cached key once. Our own because megatron-core's
inference contexts slice the cache with Python integers (nothing a CUDA graph can replay) and need CUDA or flash-attn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_megatron.generation.decode_attention import attend_and_write


@dataclass
class AttentionWindow:
    """What every layer's attention does in one forward: which cache cells it writes, which keys it reads."""

    bias: Tensor | None
    """Additive mask ``[batch, 1, queries, keys]`` (0 or -inf), or ``[batch, heads, queries, keys]`` with ALiBi's
    bias added; ``None`` means plain causal attention."""
    rows: slice | None = None
    """Cache rows of the batch; ``None``: no cache (attend over the forward's own keys)."""
    positions: Tensor | None = None
    """Cache positions of the queries (``[queries]``, long, on the device)."""
    kv_length: int = 0
    """Keys at cache positions ``[0, kv_length)`` are attended over."""
    valid: Tensor | None = None
    """Set for decode steps through :mod:`.decode_attention`: the rows' ``valid`` cells, from which that kernel builds
    the mask itself (``bias`` is then unused)."""
    slopes: Tensor | None = None
    """With ``valid`` and ALiBi: this rank's heads' slopes (the kernel adds ALiBi's term from the cells' positions)."""


class KVCache:
    """Keys and values of every attention layer of this rank, and which cache cells hold a row's own tokens."""

    def __init__(self, layers: dict[int, tuple[int, int]], rows: int, length: int, dtype: torch.dtype,
                 device: torch.device, positions: bool = False, counters: int = 0) -> None:
        """``layers`` maps megatron's layer number to ``(key/value groups on this rank, head dim)``; ``positions``
        also keeps each cell's sequence position (what ALiBi's bias is computed from); ``counters``: how many
        (row, head) pairs :mod:`.decode_attention` may count finished key spans for."""
        self.rows = rows
        self.length = length
        # Zeroed: masked weights are exactly 0, but 0 x NaN found in never-written memory would still be NaN.
        self.keys = {n: torch.zeros(rows, g, length, d, dtype=dtype, device=device) for n, (g, d) in layers.items()}
        self.values = {n: torch.zeros_like(k) for n, k in self.keys.items()}
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(rows, length, dtype=torch.long, device=device) if positions else None
        """``[rows, length]``: the position in its own sequence of the token each cell holds (written with the keys)."""
        self.counters = torch.zeros(counters, dtype=torch.int32, device=device)
        """The decode kernel's per-(row, head) counters (zero between launches; kept here so a CUDA graph replays
        them rather than zeroing new ones each step)."""

    def move_rows(self, dst: Tensor, src: Tensor) -> None:
        """Copy rows ``src`` into rows ``dst`` (long tensors on the device): slot compaction, beam reordering."""
        extra = () if self.positions is None else (self.positions,)
        for buffer in (*self.keys.values(), *self.values.values(), self.valid, *extra):
            buffer[dst] = buffer[src]

    def save(self, row: int, start: int, end: int) -> dict[int, tuple[Tensor, Tensor]]:
        """A copy of row ``row``'s keys/values at positions ``[start, end)``, per layer."""
        return {n: (k[row, :, start:end].clone(), self.values[n][row, :, start:end].clone())
                for n, k in self.keys.items()}

    def restore(self, row: int, saved: dict[int, tuple[Tensor, Tensor]], start: int) -> None:
        """Write keys/values from :meth:`save` into row ``row`` from position ``start`` on (a saved span begins at its
        sequence's first token, so the cells hold sequence positions 0, 1, ...)."""
        for n, (key, value) in saved.items():
            end = start + key.shape[1]
            self.keys[n][row, :, start:end] = key
            self.values[n][row, :, start:end] = value
            if self.positions is not None:
                self.positions[row, start:end] = torch.arange(end - start, device=self.positions.device)

    def write(self, layer: int, window: AttentionWindow, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``key``/``value`` (``[queries, batch, groups, dim]``) in ``window``; return the keys/values to read."""
        keys, values = self.keys[layer][window.rows], self.values[layer][window.rows]
        keys.index_copy_(2, window.positions, key.permute(1, 2, 0, 3))
        values.index_copy_(2, window.positions, value.permute(1, 2, 0, 3))
        return keys[:, :, : window.kv_length], values[:, :, : window.kv_length]


def attend(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Attention of ``query`` ``[b, heads, q, d]`` over ``key``/``value`` ``[b, groups, k, d]``; returns ``[b, heads, q, d]``."""
    heads, groups = query.shape[1], key.shape[1]
    if bias is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                              enable_gqa=heads != groups)
    if heads == groups:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    # Grouped-query: the heads of a group become extra query rows of that group, so keys are read, not repeated.
    b, _, q, d = query.shape
    per_group = heads // groups
    folded = query.reshape(b, groups, per_group * q, d)
    if bias.shape[1] == heads:  # a bias per head (ALiBi) folds like the queries
        bias = bias.reshape(b, groups, per_group * q, bias.shape[-1])
    elif q > 1:
        bias = bias.repeat(1, 1, per_group, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=bias, scale=scale)
    return out.reshape(b, heads, q, d)


class WindowOwner(Protocol):
    """What :class:`CachedAttention` reads: the cache, and the window of the forward in progress."""

    cache: KVCache | None
    window: AttentionWindow


class CachedAttention(torch.nn.Module):
    """A ``core_attention`` for generation: reads the current :class:`AttentionWindow` from its owner."""

    def __init__(self, owner: WindowOwner, layer_number: int, softmax_scale: float,
                 alibi_slopes: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.alibi_slopes = alibi_slopes
        """The replaced core attention's ALiBi slopes (the owner adds ALiBi's bias to the window's)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None,
                attn_mask_type: object = None, attention_bias: Tensor | None = None,
                packed_seq_params: object = None) -> Tensor:
        """``query`` ``[q, b, heads, d]``, ``key``/``value`` ``[q, b, groups, d]`` -> ``[q, b, heads * d]``."""
        window = self.owner.window
        if window.valid is not None:
            cache = self.owner.cache
            cell_positions = None if window.slopes is None else cache.positions[window.rows]
            return attend_and_write(query, key, value, cache.keys[self.layer_number][window.rows],
                                    cache.values[self.layer_number][window.rows], window.valid, window.positions,
                                    window.kv_length, self.softmax_scale, window.slopes, cell_positions,
                                    counters=cache.counters)
        if window.rows is None:
            keys, values = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        else:
            keys, values = self.owner.cache.write(self.layer_number, window, key, value)
        out = attend(query.permute(1, 2, 0, 3), keys, values, window.bias, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def blocked_to_bias(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask from a boolean one (True where attention is blocked)."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))


def causal_bias(valid: Tensor, queries: Tensor, kv_length: int, dtype: torch.dtype) -> Tensor:
    """The mask of queries at cache positions ``queries`` over keys ``[0, kv_length)`` of rows whose cells are ``valid``.

    A query sees the valid keys at or before it; a query at a cell that is not valid (padding) sees itself, so no
    row of the attention is empty (SDPA turns those into NaN).
    """
    keys = torch.arange(kv_length, device=valid.device)
    allowed = valid[:, None, :kv_length] & (keys[None, None, :] <= queries[None, :, None])
    allowed |= keys[None, None, :] == queries[None, :, None]
    return blocked_to_bias(~allowed[:, None], dtype)
