"""One forward pass of a (tensor/pipeline) parallel GPT for generation, and the collectives around it.

megatron-core's inference engines need flash-attn or CUDA, so generation drives ``GPTModel.forward`` itself: the
first pipeline stage embeds the tokens, hidden states travel stage to stage with ``torch.distributed`` send/recv
(through every virtual chunk in pipeline order), and the last stage produces the logits gathered over tensor-
parallel ranks. Decisions taken from the logits (the sampled tokens) are made on one rank - tensor rank 0 of the
last stage - and broadcast, so every rank of the model replica runs the same next step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import Attention

from lightning_megatron.parallel import unwrap


class ModelRunner:
    """Runs a model's local chunks (one or several virtual stages) as one pipeline forward for inference."""

    def __init__(self, chunks: Sequence[torch.nn.Module], vocab_size: int) -> None:
        self.chunks = list(chunks)
        self.models = [unwrap(chunk) for chunk in self.chunks]
        self.vocab_size = vocab_size
        config = self.models[0].config
        if config.context_parallel_size > 1:
            raise ValueError(
                "generation does not split sequences over context-parallel ranks; load the model with "
                "context_parallel_size=1 (any tensor/pipeline layout works)"
            )
        self.hidden_size = config.hidden_size
        self.dtype = next(self.models[0].parameters()).dtype
        self.device = next(self.models[0].parameters()).device
        self.distributed = dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size() if self.distributed else 1
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size() if self.distributed else 1

    # ------------------------------------------------------------------ roles
    @property
    def is_last_stage(self) -> bool:
        """Whether this rank computes the logits."""
        return not self.distributed or parallel_state.is_pipeline_last_stage()

    @property
    def is_source(self) -> bool:
        """Whether this rank samples (tensor rank 0 of the last pipeline stage); the others receive its choices."""
        return self.is_last_stage and (not self.distributed or parallel_state.get_tensor_model_parallel_rank() == 0)

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
        return box[0]

    # ------------------------------------------------------------------ cache
    def new_cache(self, max_batch_size: int, max_sequence_length: int) -> StaticInferenceContext:
        """A zeroed key/value cache of ``max_batch_size`` rows by ``max_sequence_length`` positions.

        megatron allocates the cache with ``torch.empty`` on first use; masked attention weights are exactly 0, but
        0 x NaN found in never-written memory is NaN, so the buffers are allocated here, zeroed.
        """
        cache = StaticInferenceContext(max_batch_size, max_sequence_length)
        for model in self.models:
            for module in model.modules():
                if isinstance(module, Attention):
                    shape = (max_sequence_length, max_batch_size, module.num_query_groups_per_partition)
                    cache.key_value_memory_dict[module.layer_number] = (
                        torch.zeros(*shape, module.key_hidden_size, dtype=self.dtype, device=self.device),
                        torch.zeros(*shape, module.val_hidden_size, dtype=self.dtype, device=self.device),
                    )
        return cache

    @staticmethod
    def move_rows(cache: StaticInferenceContext, dst: Sequence[int], src: Sequence[int]) -> None:
        """Copy the cached keys/values of batch rows ``src`` into rows ``dst`` (slot compaction, beam reordering)."""
        if not dst:
            return
        dst_index = torch.tensor(list(dst))
        src_index = torch.tensor(list(src))
        for key, value in cache.key_value_memory_dict.values():
            key[:, dst_index.to(key.device)] = key[:, src_index.to(key.device)].clone()
            value[:, dst_index.to(value.device)] = value[:, src_index.to(value.device)].clone()

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def inference_mode(self) -> Iterator[None]:
        """Eval mode, no autograd, and sequence parallelism off (single-token steps cannot split over TP ranks)."""
        training = [chunk.training for chunk in self.chunks]
        restore: list[tuple[Any, str, Any]] = []
        for model in self.models:
            for module in model.modules():
                for name in ("sequence_parallel", "reduce_scatter_embeddings"):
                    if getattr(module, name, None) is True:
                        restore.append((module, name, True))
                        setattr(module, name, False)
                config = getattr(module, "config", None)
                if getattr(config, "sequence_parallel", False):
                    restore.append((config, "sequence_parallel", True))
                    config.sequence_parallel = False
        for chunk in self.chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for owner, name, value in reversed(restore):
                setattr(owner, name, value)
            for chunk, mode in zip(self.chunks, training):
                chunk.train(mode)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: StaticInferenceContext | None = None,
    ) -> torch.Tensor | None:
        """Logits ``[batch, positions, vocab]`` (float32, sliced to the real vocabulary) on the last stage.

        ``attention_mask`` is ``[batch, 1, queries, keys]``, True where attention is blocked (``None``: causal).
        With a ``cache`` only the last position's logits come back. Other stages return ``None``.
        """
        tokens = tokens.to(self.device)
        position_ids = position_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        shape = (tokens.shape[1], tokens.shape[0], self.hidden_size)
        output: torch.Tensor | None = None
        for chunk, model in zip(self.chunks, self.models):
            if not model.pre_process:
                hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            output = chunk(tokens, position_ids, attention_mask, inference_context=cache,
                           runtime_gather_output=True)
            if not model.post_process:
                dist.send(output.to(self.dtype).contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                output = None
        if output is None:
            return None
        return output[..., : self.vocab_size].float()
