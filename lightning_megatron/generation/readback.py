"""Reading a step's chosen tokens back to the host without waiting for the steps launched after it.

A plain ``tensor.tolist()`` waits for everything queued on the stream, so a decode step launched ahead (see the
engine's lookahead) would be waited for too. Here the tokens and their log probabilities are copied into pinned host
memory asynchronously and an event marks the copy's end: waiting on it waits for that step alone. On the CPU the copy
is synchronous and there is nothing to wait for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass
class InFlight(Generic[T]):
    """A step's chosen tokens on their way to the host, with what the step ran for (its ``requests``)."""

    requests: list[T]
    host: torch.Tensor
    """``[2, rows]`` float64: the tokens and their log probabilities, filled by the copy."""
    ready: torch.cuda.Event | None
    """Recorded after the copy (``None`` where the copy is synchronous)."""

    def wait(self) -> tuple[list[int], list[float]]:
        """The tokens and log probabilities, once the copy (and the step that chose them) has finished."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, logprobs = self.host.tolist()
        return [int(t) for t in tokens], logprobs


class ReadBack:
    """Two host buffers of up to ``rows`` tokens: one step's tokens are read while the next step's are copied."""

    def __init__(self, rows: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        # Flat, so that every step's slice is contiguous (a copy into a strided host view is synchronous).
        self._buffers = [torch.empty(2 * rows, dtype=torch.float64, pin_memory=pinned) for _ in range(2)]

    def start(self, tokens: torch.Tensor, logprobs: torch.Tensor, requests: list[T]) -> InFlight[T]:
        """Queue the copy of one step's ``tokens`` and ``logprobs`` (``[rows]`` on the device)."""
        self._buffers.reverse()
        host = self._buffers[0][: 2 * len(tokens)].view(2, -1)
        host.copy_(torch.stack([tokens.double(), logprobs.double()]), non_blocking=True)
        ready = None
        if host.is_pinned():
            ready = torch.cuda.Event()
            ready.record()
        return InFlight(requests, host, ready)
