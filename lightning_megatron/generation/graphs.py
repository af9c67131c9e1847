"""CUDA graphs of generation steps, one per step kind and shape bucket, captured on first use.

A decode step of a small model is a few hundred small kernels; launched from Python each costs microseconds of host
time, replayed from a CUDA graph they run back to back. Each step reads every input from device buffers (see
:class:`~lightning_megatron.generation.runner.ModelRunner`), so one capture serves every replay of its shape: the
batch is padded up to a bucket (padding rows compute into free cache rows and are never read), attention reads the
keys of a length bucket (positions past the clock are masked) and prompts are padded on the left to a length bucket.
Graphs share one memory pool; their only outputs are the logits, which stay referenced, so replays in any order are
safe.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

StepFn = Callable[[int, int], Tensor | None]
"""``step(batch, length)``: one step over cache rows ``[0, batch)`` and ``length`` cache positions."""


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit`` itself."""
    sizes = []
    size = smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


class StepGraphs:
    """Captures steps per (kind, batch bucket, length bucket) and replays them; runs steps eagerly if capture fails."""

    def __init__(self, max_batch: int, max_length: int) -> None:
        self.batch_buckets = buckets(max_batch)
        self.length_buckets = buckets(max_length, smallest=min(16, max_length))
        self.graphs: dict[tuple[str, int, int], tuple[torch.cuda.CUDAGraph, Tensor | None]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed: str | None = None
        """Why a capture failed (steps then run eagerly), or ``None``."""

    def batch(self, size: int) -> int:
        """The batch bucket that holds ``size`` rows."""
        return next(bucket for bucket in self.batch_buckets if bucket >= size)

    def length(self, size: int) -> int | None:
        """The length bucket that holds ``size`` positions (``None`` past the cache)."""
        return next((bucket for bucket in self.length_buckets if bucket >= size), None)

    def run(self, name: str, step: StepFn, batch: int, length: int, eager: StepFn | None = None) -> Tensor | None:
        """Replay (capturing on first use) ``step(batch, length)``; ``eager`` runs instead if capture fails."""
        if self.failed is None and (name, batch, length) not in self.graphs:
            try:
                self.graphs[name, batch, length] = self._capture(step, batch, length)
            except RuntimeError as error:
                self.failed = str(error).splitlines()[0]
                log.warning("CUDA graph capture failed (%s); generation runs eagerly", self.failed)
        if self.failed is not None:
            return (eager or step)(batch, length)
        graph, logits = self.graphs[name, batch, length]
        graph.replay()
        return logits

    def _capture(self, step: StepFn, batch: int, length: int) -> tuple[torch.cuda.CUDAGraph, Tensor | None]:
        # Warm-up runs on a side stream settle lazy initialisation (cuBLAS handles, kernel choice, compilation and
        # any recompilation) outside the capture. They compute exactly what the captured step will, so running them
        # changes no result.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(batch, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step(batch, length)
        return graph, logits
