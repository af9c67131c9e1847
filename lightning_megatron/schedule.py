"""Microbatches, megatron's forward-backward schedules, and the reduction of the loss.

A training step receives the batch of one data-parallel rank (``micro_batch_size × num_microbatches`` samples),
splits it into microbatches, and runs megatron-core's schedule for the pipeline layout (no pipelining, 1F1B, or
interleaved 1F1B) over them; forward and backward both happen inside the schedule. Losses are sums over tokens:
megatron divides the gradients by the token count of the whole global batch (``calculate_per_token_loss``), so the
step computes the same per-token mean whatever the TP/PP/DP/CP layout and whatever the padding per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.utils import get_pp_last_rank
from megatron.core.process_groups_config import ProcessGroupCollection

from lightning_megatron.errors import UserError

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps a stage's output to ``(sum of per-token losses, number of tokens)``."""

ForwardStep = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, LossFn]]
"""Runs one model chunk on one microbatch; returns its output and the loss function for it."""


@dataclass(frozen=True)
class StepResult:
    """What one step computed, identical on every rank, kept on the device: nothing is read back until asked."""

    totals: torch.Tensor
    """``[sum of token losses, tokens that counted]`` over the global batch (float32, on the model's device)."""

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss per token over the global batch (a 0-dim float32 tensor on the model's device)."""
        return self.totals[0] / self.totals[1]

    @property
    def num_tokens(self) -> int:
        """Tokens that counted towards the loss, summed over the global batch (reads the count back)."""
        return int(self.totals[1].item())


class EmptyBatchCheck:
    """Raises once a global batch without loss tokens has been seen, reading the token counts back only when
    :meth:`check` is called (once per logging interval, so that training steps need not wait for the device)."""

    def __init__(self) -> None:
        self._counts: list[torch.Tensor] = []

    def add(self, result: StepResult) -> None:
        """Remember the token count of one step, on the device (no kernel: the minimum is taken by :meth:`check`)."""
        self._counts.append(result.totals[1])

    def check(self) -> None:
        """Raise :class:`UserError` if a step since the last check had no loss tokens."""
        counts, self._counts = self._counts, []
        if counts and torch.stack(counts).min().item() == 0:
            raise UserError("every token of a global batch is masked out of the loss (loss_mask is all zeros); "
                            "check the data's loss_mask and padding")


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """The number of samples in a batch dict (the leading dimension of its tensors)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise UserError("a batch must be a dict holding at least one tensor")


def split_microbatches(batch: Mapping[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """Cut a batch dict into microbatches of ``micro_batch_size`` samples along the first dimension."""
    size = batch_size_of(batch)
    if size % micro_batch_size:
        raise UserError(
            f"a data-parallel rank received {size} samples, which is not a multiple of micro_batch_size="
            f"{micro_batch_size}; make the per-rank batch (global_batch_size / data parallel size) a multiple of it"
        )
    count = size // micro_batch_size
    pieces: list[dict[str, Any]] = [{} for _ in range(count)]
    for key, value in batch.items():
        parts = value.split(micro_batch_size) if isinstance(value, torch.Tensor) else [value] * count
        for piece, part in zip(pieces, parts):
            piece[key] = part
    return pieces


def _megatron_forward_step(forward_step: ForwardStep) -> Callable:
    """Adapt our ``forward_step(model, batch)`` to megatron's ``(data_iterator, model)`` protocol."""

    def step(data_iterator: Iterator[Mapping[str, torch.Tensor]], model: torch.nn.Module):
        output, loss_fn = forward_step(model, next(data_iterator))

        def megatron_loss(output_tensor: torch.Tensor):
            loss_sum, num_tokens = loss_fn(output_tensor)
            num_tokens = torch.as_tensor(num_tokens, device=loss_sum.device).reshape(())
            report = torch.stack([loss_sum.detach().float(), num_tokens.float()])
            return loss_sum, num_tokens.int(), {"loss": report}

        return output, megatron_loss

    return step


def finalize_grads(model: list[torch.nn.Module], num_tokens: torch.Tensor | None = None,
                   pg_collection: ProcessGroupCollection | None = None, force_all_reduce: bool = False) -> None:
    """megatron's ``finalize_model_grads`` (gradient all-reduces, then division by the global batch's token count),
    with the division made without reading the count back: megatron skips it when the count is 0, which dividing by
    ``max(count, 1)`` does too, since a batch without loss tokens has zero gradients."""
    finalize_model_grads(model, None, pg_collection, force_all_reduce)
    if num_tokens is None:
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group() if pg_collection is None else pg_collection.pp
    dp_cp_group = (parallel_state.get_data_parallel_group(with_context_parallel=True) if pg_collection is None
                   else pg_collection.dp_cp)
    if pp_group.size() > 1:
        dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    if dp_cp_group.size() > 1:
        dist.all_reduce(num_tokens, group=dp_cp_group)
    scaling = 1.0 / num_tokens.clamp(min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


def run_schedule(
    forward_step: ForwardStep,
    chunks: Sequence[torch.nn.Module],
    microbatches: list[dict[str, Any]],
    seq_length: int,
    forward_only: bool,
) -> StepResult:
    """Run forward (and backward unless ``forward_only``) over the microbatches and reduce the loss.

    Every model chunk gets its own iterator over the same microbatches (interleaved schedules pull from each).
    The loss is summed over microbatches and over the data- and context-parallel group on the last pipeline
    stage, then broadcast to the other stages so that every rank logs and monitors the same value.
    """
    schedule = get_forward_backward_func()
    iterators = [iter(microbatches) for _ in chunks]
    reports = schedule(
        forward_step_func=_megatron_forward_step(forward_step),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=batch_size_of(microbatches[0]),
        forward_only=forward_only,
    )
    if reports:  # summed in microbatch order: the bits of adding each to zeros, without the zeros
        total = reports[0]["loss"]
        for report in reports[1:]:
            total = total + report["loss"]
    else:  # a stage before the last
        total = torch.zeros(2, dtype=torch.float32, device=next(chunks[0].parameters()).device)
    if dist.is_initialized():
        # Collectives over a group of one rank change nothing but still cost a launch each.
        if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    result = StepResult(total)
    if forward_only:
        check = EmptyBatchCheck()
        check.add(result)
        check.check()
    return result
