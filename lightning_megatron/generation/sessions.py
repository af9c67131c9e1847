"""Conversations whose keys/values outlive their requests, so a follow-up computes only its new tokens.

When a request of a session finishes, the cache cells of its row (every token but the last generated one) are
copied out per layer; the next request of the session gets them written back into its own row before its prefill,
which then computes only the new text. Every rank of a model replica keeps the same sessions: each change happens
in the engine loop on every rank alike, except expiry by idle time, which the rank taking requests decides and the
engine broadcasts as an explicit end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from torch import Tensor

SavedKV = dict[int, tuple[Tensor, Tensor]]
"""Keys and values of some cache cells, per layer number of this rank."""


@dataclass
class Session:
    """One conversation: its tokens, and the keys/values of ``tokens[:cached]``."""

    tokens: list[int] = field(default_factory=list)
    """Every token of the conversation so far (prompts and generated tokens)."""
    saved: SavedKV | None = None
    cached: int = 0
    busy: bool = False
    """A request of this session is waiting or running."""
    ending: bool = False
    """Ended while a request ran: forgotten once that request finishes."""
    used_step: int = 0
    used_time: float = 0.0


class SessionStore:
    """The sessions of one engine, ended explicitly, after ``ttl`` idle seconds, or least recently used first once
    they hold more than ``max_tokens`` cached tokens together."""

    def __init__(self, ttl: float, max_tokens: int) -> None:
        self.ttl = ttl
        self.max_tokens = max_tokens
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # submit() runs on the HTTP thread, the rest on the engine's

    def __contains__(self, session_id: object) -> bool:
        return session_id in self.sessions

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.sessions))

    def __len__(self) -> int:
        return len(self.sessions)

    def begin(self, session_id: str, tokens: list[int]) -> tuple[list[int], int]:
        """Reserve a session for a new request: ``(the whole conversation's tokens, how many are cached)``."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                return tokens, 0
            if session.busy:
                raise ValueError(f"session {session_id!r} has a request running; wait for its answer")
            return session.tokens + tokens, session.cached

    def hold(self, session_id: str) -> None:
        """Mark a session busy (created if new) for a request that will run."""
        with self._lock:
            self.sessions.setdefault(session_id, Session()).busy = True

    def take(self, session_id: str) -> SavedKV:
        """The saved keys/values of a session whose request is being admitted (the row holds them from now on)."""
        session = self.sessions[session_id]
        saved, session.saved = session.saved, None
        return saved

    def end(self, session_id: str) -> None:
        """Forget a session now, or when its running request finishes."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is not None and session.busy:
                session.ending = True
            elif session is not None:
                del self.sessions[session_id]

    def keep(self, session_id: str, tokens: list[int] | None, saved: SavedKV | None, step: int) -> None:
        """A request of the session finished: keep ``tokens`` and ``saved``, the keys/values of all of them but the
        last (``tokens=None``: the request never ran, the session stays as it was); then evict past the token cap."""
        with self._lock:
            session = self.sessions[session_id]
            if tokens is not None:
                session.tokens, session.saved, session.cached = tokens, saved, len(tokens) - 1
            session.busy = False
            session.used_step, session.used_time = step, time.monotonic()
            if session.ending:
                del self.sessions[session_id]
            idle = sorted((s.used_step, key) for key, s in self.sessions.items() if not s.busy)
            while idle and sum(s.cached for s in self.sessions.values() if s.saved is not None) > self.max_tokens:
                del self.sessions[idle.pop(0)[1]]

    def expired(self) -> list[str]:
        """Idle sessions older than ``ttl``."""
        now = time.monotonic()
        return [key for key, s in list(self.sessions.items()) if not s.busy and now - s.used_time > self.ttl]
