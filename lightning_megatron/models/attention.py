"""Core attention on PyTorch's ``scaled_dot_product_attention``, with context parallelism, for the local layer spec.

megatron-core's local ``DotProductAttention`` materialises the full score matrix and refuses context parallelism
(only Transformer Engine's ring attention supports it). :class:`SDPAttention` is a drop-in ``core_attention``
submodule that lets PyTorch pick flash/cuDNN/memory-efficient kernels on GPUs, supports grouped-query attention,
padding masks and dropout, and - when ``context_parallel_size > 1`` - all-gathers keys and values across the
context-parallel group. Our own because megatron-core offers no CP-capable attention without Transformer Engine.

Under context parallelism each rank holds two of the ``2 x CP`` equal chunks of the sequence (chunk ``r`` and chunk
``2CP-1-r``, megatron's load-balanced layout produced by ``get_batch_on_this_cp_rank``), so every rank does about
the same causal work. After the all-gather, keys are in rank order, and the causal mask is built from the global
positions of the local queries and the gathered keys.

With ``alibi=True`` (``GPTConfig(position_embedding_type="alibi")``) the scores get ALiBi's linear bias,
``-slope_h * (query position - key position)``, from the global positions as well (so context parallelism keeps it
exact); each tensor-parallel rank holds the slopes of its own heads. megatron-core has no ALiBi.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward reduce-scatters (each rank's keys feed every rank's queries)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: torch.distributed.ProcessGroup) -> Tensor:
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        world = torch.distributed.get_world_size(ctx.group)
        parts = [part.contiguous() for part in grad.chunk(world, dim=0)]
        out = torch.empty_like(parts[0])
        torch.distributed.reduce_scatter(out, parts, group=ctx.group)
        return out, None


def context_parallel_positions(local_length: int, cp_size: int, cp_rank: int, device: torch.device) -> Tensor:
    """Global sequence positions of the tokens a CP rank holds (its two load-balanced chunks, in order)."""
    chunk = local_length // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022, as BLOOM computes them) for any head count, float32 ``[heads]``.

    For ``n`` heads, a power of two, the slopes are ``2^(-8/n), 2^(-16/n), ...``; otherwise the ``n'`` slopes of the
    largest power of two ``n' < n`` come first, then every other slope of ``2n'`` heads
    (``2^(-4/n'), 2^(-12/n'), ...``).
    """
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one attention head, got {num_heads}")
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * power / closest) for power in range(1, closest + 1)]
    slopes += [2.0 ** (-4.0 * power / closest) for power in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """ALiBi's additive scores ``-slope_h * (query position - key position)``, float32.

    Positions ``[q]``/``[k]`` give ``[heads, q, k]``; per-row positions ``[b, q]``/``[b, k]`` give ``[b, heads, q, k]``.
    """
    distance = (query_positions[..., :, None] - key_positions[..., None, :]).float()
    return distance.unsqueeze(-3) * -slopes.float()[:, None, None]


@functools.lru_cache(maxsize=8)
def _slopes_on(slopes: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(slopes, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=4)
def _causal_alibi(slopes: tuple[float, ...], queries: int, keys: int, cp_size: int, cp_rank: int,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    """The causal ALiBi mask ``[heads, queries, keys]`` of one shape and rank, made once and shared by every layer
    (each layer's backward keeps its mask)."""
    query_positions, key_positions = _positions(queries, keys, cp_size, cp_rank, device)
    bias = alibi_bias(_slopes_on(slopes, device), query_positions, key_positions)
    return bias.masked_fill_(key_positions[None, :] > query_positions[:, None], float("-inf")).to(dtype)


def _positions(queries: int, keys: int, cp_size: int, cp_rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Global sequence positions of a rank's queries and of the keys it attends over (under context parallelism,
    every rank's keys in rank order)."""
    if cp_size == 1:
        return torch.arange(queries, device=device), torch.arange(keys, device=device)
    gathered = torch.cat([context_parallel_positions(queries, cp_size, r, device) for r in range(cp_size)])
    return context_parallel_positions(queries, cp_size, cp_rank, device), gathered


class SDPAttention(MegatronModule):
    """megatron-core ``core_attention`` over ``F.scaled_dot_product_attention``; supports CP without TE."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
        alibi: bool = False,
    ) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.cp_size = config.context_parallel_size
        self.alibi_slopes: tuple[float, ...] | None = None
        """ALiBi slopes of this rank's heads (tensor-parallel ranks hold consecutive heads); ``None``: no ALiBi."""
        if alibi:
            first = parallel_state.get_tensor_model_parallel_rank() * self.heads
            self.alibi_slopes = tuple(alibi_slopes(config.num_attention_heads)[first : first + self.heads].tolist())

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> Tensor:
        """``query``: [sq, b, heads, d]; ``key``/``value``: [sk, b, groups, d]; returns [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias; use the TE spec")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        blocked = attention_mask
        cp_rank = 0
        if self.cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            cp_rank = parallel_state.get_context_parallel_rank()
            key = _AllGatherSequence.apply(key, group)
            value = _AllGatherSequence.apply(value, group)
            if blocked is not None:
                # The batch's mask was cut along queries only; its key axis is still in sequence order.
                _, keys = _positions(query.shape[0], key.shape[0], self.cp_size, cp_rank, query.device)
                blocked = blocked.index_select(-1, keys)
        # [s, b, h, d] -> [b, h, s, d], the layout SDPA's kernels expect.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        mask = self._mask(q.shape[2], k.shape[2], cp_rank, q.device, q.dtype, blocked, causal)
        dropout = self.dropout if self.training else 0.0
        with self._dropout_rng(dropout):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, scale=self.softmax_scale
            )
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)

    def _mask(self, queries: int, keys: int, cp_rank: int, device: torch.device, dtype: torch.dtype,
              blocked: Tensor | None, causal: bool) -> Tensor | None:
        """SDPA's ``attn_mask``: ``None`` (no mask, or plain causal: fused kernels run), a boolean mask of what may be
        attended, or with ALiBi the additive bias (``-inf`` where blocked). Positions are global under CP."""
        if self.alibi_slopes is None and self.cp_size == 1 and blocked is None:
            return None
        if self.alibi_slopes is not None and causal and blocked is None:
            return _causal_alibi(self.alibi_slopes, queries, keys, self.cp_size, cp_rank, device, dtype)
        query_positions, key_positions = _positions(queries, keys, self.cp_size, cp_rank, device)
        if causal:
            future = key_positions[None, :] > query_positions[:, None]
            blocked = future if blocked is None else blocked | future
        if self.alibi_slopes is None:
            return None if blocked is None else ~blocked
        bias = alibi_bias(_slopes_on(self.alibi_slopes, device), query_positions, key_positions)
        return (bias if blocked is None else bias.masked_fill(blocked, float("-inf"))).to(dtype)

    def _dropout_rng(self, dropout: float):
        """Attention dropout of TP ranks must differ (each holds other heads), as in megatron's own attention."""
        if dropout > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
