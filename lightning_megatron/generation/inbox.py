"""How requests and commands reach the engine loop: from any thread, and from the leader to every rank.

The engine's ``submit``, ``cancel``, ``close`` and ``end_session`` may be called from another thread (the server's
HTTP thread) while the loop steps, so they only post a message here; the loop takes every message at the start of its
next step. Where only global rank 0 takes requests (``leader_submits``), what it took is broadcast, so that every rank
applies the same messages at the same step and the ranks stay in lockstep.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch.distributed as dist


class Inbox:
    """Messages ``(kind, item)`` posted from any thread, taken by the engine loop in the order they were posted."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._arrived = threading.Event()

    def __len__(self) -> int:
        return self._queue.qsize()

    def post(self, kind: str, item: Any) -> None:
        """Queue a message for the next step and wake a loop waiting in :meth:`wait`."""
        self._queue.put((kind, item))
        self._arrived.set()

    def wait(self, timeout: float) -> None:
        """Block until a message is posted or ``timeout`` seconds pass (at once for a timeout of 0)."""
        self._arrived.wait(timeout)
        self._arrived.clear()

    def take(self, broadcast: bool) -> list[tuple[str, Any]]:
        """Every message posted so far; with ``broadcast`` (on every rank together), global rank 0's messages."""
        messages: list[tuple[str, Any]] = []
        while not self._queue.empty():
            messages.append(self._queue.get_nowait())
        if broadcast:
            box = [messages]
            dist.broadcast_object_list(box, src=0)
            messages = box[0]
        return messages
