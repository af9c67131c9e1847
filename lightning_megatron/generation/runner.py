"""Forward passes of a (tensor/pipeline) parallel GPT for generation, and the collectives around them.

The runner drives the pieces of megatron-core's ``GPTModel`` itself - embedding, transformer block, output layer -
so that every input that changes from step to step is a tensor: token ids, each sequence's own positions (learned
position embeddings and rotary embeddings alike), the cache positions written and the attention mask. That is what
lets a decode step be captured once in a CUDA graph and replayed for every token (:mod:`.graphs`). While generating,
each layer's core attention is :class:`~lightning_megatron.generation.kv_cache.CachedAttention`.

The first pipeline stage embeds the tokens, hidden states travel stage to stage with ``torch.distributed``
send/recv (through every virtual chunk in pipeline order), and the last stage produces logits gathered over tensor-
parallel ranks. Decisions taken from the logits (the sampled tokens) are made on one rank - tensor rank 0 of the
last stage of context-parallel rank 0 - and broadcast, so every rank of the model replica runs the same next step.
Under context parallelism every context-parallel rank runs whole sequences (generation reads one token at a time,
so there is nothing to split).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import Attention
from torch import Tensor

from lightning_megatron.backends import HAVE_TRITON
from lightning_megatron.generation import decode_attention
from lightning_megatron.generation.compiled import compile_step
from lightning_megatron.generation.gemv import build as build_gemv
from lightning_megatron.generation.gemv import gemv, usable
from lightning_megatron.generation.graphs import StepGraphs
from lightning_megatron.generation.kv_cache import (
    AttentionWindow,
    CachedAttention,
    KVCache,
    blocked_to_bias,
    causal_bias,
)
from lightning_megatron.generation.quantize import GEMV, Int8Linear
from lightning_megatron.models.attention import alibi_bias
from lightning_megatron.parallel import unwrap


class ModelRunner:
    """Runs a model's local chunks (one or several virtual stages) as one pipeline forward for inference.

    ``cuda_graphs``: replay decode steps (and the prefill of a fresh batch) from CUDA graphs (default: on CUDA when
    this process holds the whole model replica; tensor/pipeline/context-parallel replicas run eagerly).
    ``compile``: ``torch.compile`` the decode step (before capturing it in graphs), one graph per model (see
    :mod:`.compiled`); fuses small kernels on any device, at the cost of compiling at the first steps.
    ``kernels``: on CUDA with Triton, decode through our kernels - one-row products (:mod:`.gemv`, one process) and
    the decode step's attention with its cache write (:mod:`.decode_attention`); ``False``: torch's kernels only.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], vocab_size: int, cuda_graphs: bool | None = None,
                 compile: bool = False, kernels: bool = True) -> None:
        self.chunks = list(chunks)
        self.models = [unwrap(chunk) for chunk in self.chunks]
        self.vocab_size = vocab_size
        config = self.models[0].config
        self.hidden_size = config.hidden_size
        self.dtype = next(self.models[0].parameters()).dtype
        self.device = next(self.models[0].parameters()).device
        self.distributed = dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size() if self.distributed else 1
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size() if self.distributed else 1
        self.cp_size = parallel_state.get_context_parallel_world_size() if self.distributed else 1
        self.max_positions = self.models[0].max_sequence_length
        single = self.tp_size == 1 and self.pp_size == 1 and self.cp_size == 1
        if cuda_graphs and not (single and self.device.type == "cuda"):
            raise ValueError("cuda_graphs=True needs a CUDA model held by one process (tensor, pipeline and "
                             "context parallel size 1); leave it unset to decode eagerly elsewhere")
        self.use_graphs = single and self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if compile and not single:
            raise ValueError("compile=True needs a model held by one process (tensor, pipeline and context parallel "
                             "size 1)")
        int8 = any(isinstance(module, Int8Linear) for model in self.models for module in model.modules())
        self._decode_fn = compile_step(self._decode_step, int8) if compile else self._decode_step
        self.cache: KVCache | None = None
        self.window = AttentionWindow(bias=None)
        self.tokens: Tensor | None = None
        """``[rows]``: the next input token of each cache row (written by sampling, read by the decode step)."""
        self.lengths: Tensor | None = None
        """``[rows]``: the position in its own sequence of each row's next input token."""
        self.graphs: StepGraphs | None = None
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._rotary = [self._rotary_table(model) if model.position_embedding_type == "rope" else None
                        for model in self.models]
        modules = [module for model in self.models for module in model.modules()]
        self._attentions = [module for module in modules if isinstance(module, Attention)]
        slopes = {getattr(module.core_attention, "alibi_slopes", None) for module in self._attentions}
        self._alibi = None if slopes == {None} or not slopes else torch.tensor(slopes.pop(), device=self.device)
        """ALiBi slopes of this rank's heads (every layer has the same), or ``None``."""
        # Everything that sequence parallelism switched on, to switch off while generating.
        switches = {(id(module), name): (module, name) for module in modules
                    for name in ("sequence_parallel", "reduce_scatter_embeddings") if getattr(module, name, None) is True}
        switches.update({(id(module.config), "config"): (module.config, "sequence_parallel") for module in modules
                         if getattr(getattr(module, "config", None), "sequence_parallel", False)})
        self._sequence_parallel = list(switches.values())
        # Float linear layers whose one-row products (batch-1 decode) go through the matrix-vector kernel on CUDA.
        self._linears = [module for module in modules if kernels and single and self.device.type == "cuda" and HAVE_TRITON
                         and isinstance(module, (ColumnParallelLinear, RowParallelLinear))
                         and not isinstance(module, Int8Linear)]
        if self._linears or any(getattr(module, "int8_kernel", None) == GEMV for module in modules):
            build_gemv()
        self._heads = max((module.num_attention_heads_per_partition for module in self._attentions), default=0)
        self._decode_kernel = kernels and decode_attention.usable(
            self.device, {module.hidden_size_per_attention_head for module in self._attentions})
        """Whether decode steps may write the cache and attend in :mod:`.decode_attention`'s kernel (those of
        small batches do: :func:`.decode_attention.preferred`)."""
        if self._decode_kernel:
            decode_attention.build()

    # ------------------------------------------------------------------ roles
    @property
    def is_last_stage(self) -> bool:
        """Whether this rank computes the logits."""
        return not self.distributed or parallel_state.is_pipeline_last_stage()

    @property
    def is_source(self) -> bool:
        """Whether this rank samples; the other ranks of the replica receive its choices."""
        if not self.distributed:
            return True
        return (self.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_context_parallel_rank() == 0)

    def broadcast(self, obj: Any) -> Any:
        """Send ``obj`` from the source rank to every rank of this model replica; returns it everywhere."""
        if not self.distributed:
            return obj
        box = [obj]
        if self.tp_size > 1 and self.is_last_stage:
            dist.broadcast_object_list(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                       group=parallel_state.get_tensor_model_parallel_group())
        if self.pp_size > 1:
            dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                       group=parallel_state.get_pipeline_model_parallel_group())
        if self.cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    # ------------------------------------------------------------------ cache rows
    def allocate(self, rows: int, length: int) -> None:
        """A zeroed key/value cache of ``rows`` sequences by ``length`` positions, and the rows' decode inputs."""
        layers = {module.layer_number: (module.num_query_groups_per_partition, module.hidden_size_per_attention_head)
                  for module in self._attentions}
        self.cache = KVCache(layers, rows, length, self.dtype, self.device, positions=self._alibi is not None,
                             counters=rows * self._heads if self._decode_kernel else 0)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self.use_graphs:
            self.graphs = StepGraphs(max_batch=rows, max_length=length)
            # Static inputs of graphed prefills: prompts left-padded to a length bucket, in rows [0, batch).
            self._prompt = torch.zeros(rows, length, dtype=torch.long, device=self.device)
            self._prompt_positions = torch.zeros_like(self._prompt)
            self._starts = torch.zeros(rows, dtype=torch.long, device=self.device)

    def prefill_width(self, longest: int, limit: int) -> int:
        """The cache positions a fresh batch's prompts take: ``longest``, padded to a graph bucket within ``limit``."""
        if self.graphs is None:
            return longest
        bucket = self.graphs.length(longest)
        return bucket if bucket is not None and bucket <= limit else longest

    def move_rows(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """Copy cache rows ``src`` (keys, values, decode inputs) into rows ``dst``."""
        if not dst or self.cache is None:
            return
        dst_index = torch.tensor(list(dst), device=self.device)
        src_index = torch.tensor(list(src), device=self.device)
        self.cache.move_rows(dst_index, src_index)
        for buffer in (self.tokens, self.lengths):
            buffer[dst_index] = buffer[src_index]

    def save_row(self, row: int, start: int, end: int) -> dict[int, tuple[Tensor, Tensor]]:
        """A copy of cache row ``row``'s keys/values at positions ``[start, end)`` (a session's history)."""
        return self.cache.save(row, start, end)

    def restore_row(self, row: int, saved: dict[int, tuple[Tensor, Tensor]], start: int) -> None:
        """Write keys/values from :meth:`save_row` into cache row ``row`` from position ``start`` on."""
        self.cache.restore(row, saved, start)

    def set_tokens(self, first: int, tokens: Sequence[int]) -> None:
        """Make ``tokens`` the next inputs of rows ``first, first + 1, ...`` (ranks that did not sample them)."""
        if self.tokens is not None and tokens:
            self.tokens[first : first + len(tokens)] = torch.tensor(list(tokens), device=self.device)

    # ------------------------------------------------------------------ inference mode
    @contextlib.contextmanager
    def inference_mode(self) -> Iterator[None]:
        """Eval mode, no autograd, cached attention in every layer, sequence parallelism off (single-token steps
        cannot split over tensor-parallel ranks)."""
        training = [chunk.training for chunk in self.chunks]
        cores = [module.core_attention for module in self._attentions]
        for module in self._attentions:
            scale = module.config.softmax_scale or 1.0 / math.sqrt(module.hidden_size_per_attention_head)
            module.core_attention = CachedAttention(self, module.layer_number, scale,
                                                    getattr(module.core_attention, "alibi_slopes", None))
        for owner, name in self._sequence_parallel:
            setattr(owner, name, False)
        for module in self._linears:
            module._forward_impl = functools.partial(_one_row_matvec, module._forward_impl)
        for chunk in self.chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module in self._linears:
                del module._forward_impl  # the class's own again
            for module, core in zip(self._attentions, cores):
                module.core_attention = core
            for owner, name in self._sequence_parallel:
                setattr(owner, name, True)
            for chunk, mode in zip(self.chunks, training):
                chunk.train(mode)

    # ------------------------------------------------------------------ forwards
    def forward(self, tokens: Tensor, position_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """Logits ``[batch, positions, vocab]`` (float32, the real vocabulary) of whole sequences, on the last stage.

        No cache: ``attention_mask`` is ``[batch, 1, queries, keys]``, True where attention is blocked (``None``:
        causal). Other stages return ``None``.
        """
        position_ids = position_ids.to(self.device)
        if attention_mask is None and self._alibi is not None:
            attention_mask = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)[None, None]
        bias = None if attention_mask is None else blocked_to_bias(attention_mask.to(self.device), self.dtype)
        self.window = AttentionWindow(self._with_alibi(bias, position_ids, position_ids))
        return self._run(tokens.to(self.device), position_ids, last_only=False)

    def prefill(self, first_row: int, tokens: Tensor, position_ids: Tensor, starts: Sequence[int],
                clock: int, all_positions: bool = False) -> Tensor | None:
        """Write prompts into cache rows ``first_row, ...`` at cache positions ``[clock - width, clock)``.

        ``tokens``/``position_ids`` are ``[rows, width]`` (each row's prompt right-aligned, padding before it);
        row ``i``'s own tokens start at cache position ``starts[i]``. Returns the logits ``[rows, vocab]`` of the
        last position (``[rows, width, vocab]`` of every position with ``all_positions``; last stage, ``None``
        elsewhere) and makes each row's next decode position follow its prompt.
        """
        assert self.cache is not None, "allocate() the cache first"
        count, width = tokens.shape
        if (self.graphs is not None and not all_positions and first_row == 0 and width == clock
                and self.graphs.length(width) == width):
            batch = self.graphs.batch(count)
            self._prompt[:batch, :width] = 0
            self._prompt_positions[:batch, :width] = 0
            self._starts[:batch] = width  # padding rows hold no token of their own
            self._prompt[:count, :width] = tokens.to(self.device)
            self._prompt_positions[:count, :width] = position_ids.to(self.device)
            self._starts[:count] = torch.tensor(list(starts))
            logits = self.graphs.run("prefill", self._prefill_step, batch, width)
        else:
            logits = self._prefill_rows(slice(first_row, first_row + count), tokens.to(self.device),
                                        position_ids.to(self.device), torch.tensor(list(starts)).to(self.device),
                                        clock, all_positions)
        return None if logits is None else logits[:count]

    def _prefill_step(self, batch: int, width: int) -> Tensor | None:
        """The prefill of a fresh batch from the static prompt buffers (what a prefill graph replays)."""
        return self._prefill_rows(slice(0, batch), self._prompt[:batch, :width], self._prompt_positions[:batch, :width],
                                  self._starts[:batch], width)

    def _prefill_rows(self, rows: slice, tokens: Tensor, position_ids: Tensor, starts: Tensor, clock: int,
                      all_positions: bool = False) -> Tensor | None:
        cells = torch.arange(self.cache.length, device=self.device)
        self.cache.valid[rows] = (cells[None, :] >= starts[:, None]) & (cells[None, :] < clock)
        queries = torch.arange(clock - tokens.shape[1], clock, device=self.device)
        bias = causal_bias(self.cache.valid[rows], queries, clock, self.dtype)
        if self._alibi is not None:
            self.cache.positions[rows].index_copy_(1, queries, position_ids)
            bias = self._with_alibi(bias, position_ids, self.cache.positions[rows, :clock])
        self.window = AttentionWindow(bias, rows, queries, clock)
        logits = self._run(tokens, position_ids, last_only=not all_positions)
        self.lengths[rows] = position_ids[:, -1] + 1
        if logits is None or all_positions:
            return logits
        return logits[:, -1]

    def decode(self, count: int, clock: int) -> Tensor | None:
        """One token for rows ``[0, count)`` from their :attr:`tokens`, written at cache position ``clock``.

        Returns the logits ``[count, vocab]`` (last stage; ``None`` elsewhere).
        """
        assert self.cache is not None, "allocate() the cache first"
        self._position.fill_(clock)
        if self.graphs is not None:
            logits = self.graphs.run("decode", self._decode_fn, self.graphs.batch(count),
                                     self.graphs.length(clock + 1), eager=self._decode_step)
        else:
            logits = self._decode_fn(count, clock + 1)
        self.lengths[:count] += 1
        return None if logits is None else logits[:count]

    def _decode_step(self, batch: int, kv_length: int) -> Tensor | None:
        """The decode step of rows ``[0, batch)`` over keys ``[0, kv_length)``: every input is a device tensor."""
        valid = self.cache.valid[:batch]
        valid.index_fill_(1, self._position, True)
        position_ids = self.lengths[:batch, None].clamp(max=self.max_positions - 1)
        if self._alibi is not None:
            self.cache.positions[:batch].index_copy_(1, self._position, position_ids)
        if self._decode_kernel and decode_attention.preferred(batch, self._heads):
            self.window = AttentionWindow(None, slice(0, batch), self._position, kv_length, valid, self._alibi)
        else:
            bias = torch.zeros(batch, 1, 1, kv_length, dtype=self.dtype, device=self.device)
            bias.masked_fill_(~valid[:, None, None, :kv_length], float("-inf"))
            if self._alibi is not None:
                bias = self._with_alibi(bias, position_ids, self.cache.positions[:batch, :kv_length])
            self.window = AttentionWindow(bias, slice(0, batch), self._position, kv_length)
        logits = self._run(self.tokens[:batch, None], position_ids, last_only=True)
        return None if logits is None else logits[:, -1]

    def _with_alibi(self, bias: Tensor | None, query_positions: Tensor, key_positions: Tensor) -> Tensor | None:
        """``bias`` ``[batch, 1, q, k]`` plus ALiBi's term for this rank's heads from each row's sequence positions
        (``[batch, q]``, ``[batch, k]``): ``[batch, heads, q, k]``. Unchanged without ALiBi."""
        if self._alibi is None:
            return bias
        return (bias + alibi_bias(self._alibi, query_positions, key_positions)).to(self.dtype)

    def _run(self, tokens: Tensor, position_ids: Tensor, last_only: bool) -> Tensor | None:
        """All local chunks in pipeline order, with the hidden states sent and received between stages."""
        shape = (tokens.shape[1], tokens.shape[0], self.hidden_size)
        output: Tensor | None = None
        for model, rotary in zip(self.models, self._rotary):
            if not model.pre_process:
                hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            output = self._stage(model, rotary, tokens, position_ids, last_only)
            if not model.post_process:
                dist.send(output.to(self.dtype).contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                output = None
        return output

    def _stage(self, model: torch.nn.Module, rotary: Tensor | None, tokens: Tensor, position_ids: Tensor,
               last_only: bool) -> Tensor:
        """One chunk: hidden states ``[seq, batch, hidden]``, or on the last stage logits ``[batch, seq, vocab]``."""
        hidden = model.embedding(input_ids=tokens, position_ids=position_ids) if model.pre_process else None
        if rotary is not None:
            rotary = rotary[position_ids.t()]
        hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
        if not model.post_process:
            return hidden
        if last_only:
            hidden = hidden[-1:]
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)[..., : self.vocab_size].float()

    def _rotary_table(self, model: torch.nn.Module) -> Tensor:
        """``[positions, 1, dim]``: the rotary embedding of every position (before context-parallel slicing)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = model.rotary_pos_emb.get_emb(self.max_positions)
        return table[:, 0].to(self.device)


def _one_row_matvec(matmul: Any, input: Tensor, weight: Tensor, bias: Tensor | None = None, *args: Any,
                    **kwargs: Any) -> Tensor:
    """megatron's linear ``matmul`` (a layer's ``_forward_impl``), through :func:`.gemv.gemv` for one-row inputs."""
    if kwargs.get("sequence_parallel") or not usable(input, weight):
        return matmul(input, weight, bias, *args, **kwargs)
    return gemv(input, weight, bias=bias)
