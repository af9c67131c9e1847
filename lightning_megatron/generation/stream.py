"""Text as it is generated: incremental detokenisation with stop strings, and a streamer that prints it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO


class TextTracker:
    """Turns a growing list of tokens into text pieces, holding back what could still change or be a stop string.

    A piece is released once it can no longer change: bytes of an unfinished UTF-8 character and any tail that is
    the beginning of a stop string wait for the next tokens. ``update`` reports where a stop string begins.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.emitted = ""
        self.text = ""

    def update(self, tokens: Sequence[int]) -> tuple[str, bool]:
        """Decode ``tokens`` (all generated so far); return ``(new text piece, a stop string was reached)``."""
        full = self.tokenizer.decode(tokens)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = full[:cut]
            return self._release(self.text), True
        self.text = full
        safe = full.rstrip("\ufffd")
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(safe)), 0, -1):
                if safe.endswith(stop[:size]):
                    safe = safe[:-size]
                    break
        return self._release(safe), False

    def finish(self) -> str:
        """Release everything that was held back (the sequence ended)."""
        return self._release(self.text)

    def _release(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece


@dataclass
class TokenEvent:
    """One step of one request: the token it produced and the text that became final with it."""

    request_id: int
    token: int | None
    """``None`` for the last event of a beam search, whose text comes all at once."""
    text: str
    finished: bool = False
    finish_reason: str | None = None
    """``"stop"`` (end token or stop string), ``"length"`` (max_new_tokens) or ``"cancelled"``."""
    logprob: float | None = None
    """The model's log probability of ``token``."""
    top_logprobs: dict[int, float] | None = None
    """The most likely tokens at this step (when ``SamplingParams.top_logprobs``)."""


class TextStreamer:
    """Prints (or hands to ``on_text``) each piece of text as soon as it is final, like transformers' TextStreamer."""

    def __init__(self, on_text: Callable[[str], Any] | None = None, file: TextIO | None = None,
                 end: str = "\n") -> None:
        self.on_text = on_text
        self.file = file
        self.end = end

    def __call__(self, event: TokenEvent) -> None:
        """Consume one event; prints ``end`` once the request has finished."""
        piece = event.text + (self.end if event.finished else "")
        if not piece:
            return
        if self.on_text is not None:
            self.on_text(piece)
        else:
            out = self.file or sys.stdout
            out.write(piece)
            out.flush()
