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
"""

from __future__ import annotations

import contextlib
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
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        blocked = attention_mask
        if self.cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key = _AllGatherSequence.apply(key, group)
            value = _AllGatherSequence.apply(value, group)
            blocked = self._context_parallel_mask(query.shape[0], query.device, blocked, causal)
            causal = False
        # [s, b, h, d] -> [b, h, s, d], the layout SDPA's kernels expect.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        allowed = None if blocked is None else ~blocked
        if allowed is not None and causal:
            allowed = allowed & ~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
            causal = False
        dropout = self.dropout if self.training else 0.0
        with self._dropout_rng(dropout):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)

    def _context_parallel_mask(
        self, local_length: int, device: torch.device, blocked: Tensor | None, causal: bool
    ) -> Tensor | None:
        """The blocked-attention mask of local queries over keys gathered in rank order."""
        rank = parallel_state.get_context_parallel_rank()
        q_pos = context_parallel_positions(local_length, self.cp_size, rank, device)
        k_pos = torch.cat([context_parallel_positions(local_length, self.cp_size, r, device)
                           for r in range(self.cp_size)])
        if blocked is not None:
            # The batch's mask was cut along queries only; its key axis is still in sequence order.
            blocked = blocked.index_select(-1, k_pos)
        if not causal:
            return blocked
        causal_block = k_pos[None, :] > q_pos[:, None]
        return causal_block if blocked is None else blocked | causal_block

    def _dropout_rng(self, dropout: float):
        """Attention dropout of TP ranks must differ (each holds other heads), as in megatron's own attention."""
        if dropout > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
