"""Data-parallel replicas of a model at inference: a share of the work for each, the results brought together.

With ``--devices N`` and TP x PP < N the layout holds N / (TP x PP) replicas of the model (megatron's data-parallel
groups: the ranks at the same tensor/pipeline/context position of every replica). Each replica generates on its own;
:func:`map_over_replicas` splits a list of work among them, :func:`gather_to_leader` brings one object per replica
to global rank 0 (the server's listener).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch.distributed as dist
from megatron.core import parallel_state

Item = TypeVar("Item")
Result = TypeVar("Result")


def replica() -> tuple[int, int]:
    """``(this rank's replica, the number of replicas)``; ``(0, 1)`` without megatron's parallel state."""
    if not (dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def map_over_replicas(items: Sequence[Item], fn: Callable[[list[Item]], list[Result]]) -> list[Result]:
    """Replica ``r`` of ``n`` applies ``fn`` to items ``r, r + n, r + 2n, ...`` (all its ranks together; a replica
    may get none); returns every result, in the order of ``items``, on every rank.

    An exception in any replica is raised on every rank (rather than leaving the others waiting for its results).
    """
    index, count = replica()
    if count == 1:
        return fn(list(items))
    mine = list(range(index, len(items), count))
    try:
        results, error = fn([items[i] for i in mine]), None
    except Exception as caught:
        results, error = [], caught
    gathered: list[Any] = [None] * count
    dist.all_gather_object(gathered, (mine, results, error), group=parallel_state.get_data_parallel_group())
    ordered: list[Any] = [None] * len(items)
    for positions, values, failure in gathered:
        if failure is not None:
            raise failure
        for position, value in zip(positions, values):
            ordered[position] = value
    return ordered


def gather_to_leader(obj: Any) -> list[Any] | None:
    """Every replica's ``obj``, in replica order, on global rank 0; ``None`` elsewhere.

    Every rank calls it; the first rank of each replica (tensor, pipeline and context rank 0, where every rank of a
    replica holds the same generation results) sends its ``obj``.
    """
    _, count = replica()
    if count == 1:
        return [obj]
    first = (parallel_state.get_tensor_model_parallel_rank() == 0
             and parallel_state.get_pipeline_model_parallel_rank() == 0
             and parallel_state.get_context_parallel_rank() == 0)
    if not first:
        return None
    gathered: list[Any] | None = [None] * count if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0, group=parallel_state.get_data_parallel_group())
    return gathered
