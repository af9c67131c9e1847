"""What one generation request is: its checked input, its state while it runs, and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from lightning_megatron.errors import UserError
from lightning_megatron.generation.params import SamplingParams
from lightning_megatron.generation.sampling import RowState
from lightning_megatron.generation.scoring import TokenScores
from lightning_megatron.generation.stream import TextTracker


@dataclass
class GenerationOutput:
    """The result of one request."""

    request_id: int
    prompt_tokens: list[int]
    tokens: list[int]
    """Generated tokens (an ending end-of-document or stop token included)."""
    text: str | None
    """Generated text without special tokens, cut before a stop string (``None`` without a tokenizer)."""
    finish_reason: str
    """``"stop"``, ``"length"`` or ``"cancelled"``."""
    logprobs: list[float] | None
    """The model's log probability of each generated token (when ``SamplingParams.logprobs``)."""
    cumulative_logprob: float
    top_logprobs: list[dict[int, float]] | None = None
    """The most likely tokens at each generated token (when ``SamplingParams.top_logprobs``)."""
    prompt_logprobs: list[float | None] | None = None
    """The model's log probability of each prompt token, ``None`` for the first (when
    ``SamplingParams.prompt_logprobs`` is set)."""
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    """The most likely tokens at each prompt position, ``None`` for the first."""
    cached_tokens: int = 0
    """Prompt tokens whose keys/values came from the request's session instead of being computed again."""
    session_id: str | None = None

    @property
    def length(self) -> int:
        """The number of generated tokens."""
        return len(self.tokens)


@dataclass
class Request:
    """A request inside the engine (the same on every rank of the replica)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    max_new: int
    bad_words: tuple[tuple[int, ...], ...] = ()
    rows: list[RowState] = field(default_factory=list)
    slot: int = -1
    start: int = 0
    tracker: TextTracker | None = None
    hypotheses: list[tuple[float, RowState]] = field(default_factory=list)
    output: GenerationOutput | None = None
    prompt_scores: TokenScores | None = None
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    session_id: str | None = None
    cached: int = 0
    """Leading prompt tokens whose keys/values the session holds."""
    replica: int = 0
    """The data-parallel replica whose engine runs it."""

    @property
    def width(self) -> int:
        """Cache rows the request takes (its beams)."""
        return self.params.beam_width

    def advance(self, token: int, logprob: float) -> tuple[str, str | None]:
        """Take the next token of a one-row request: ``(the new text, the finish reason or None)``."""
        row = self.rows[0]
        row.advance(token, logprob)
        piece, stopped = ("", False)
        if self.tracker is not None:
            piece, stopped = self.tracker.update(row.generated)
        reason = None
        if stopped or token in row.end_ids:
            reason = "stop"
        elif len(row.generated) >= self.max_new:
            reason = "length"
        if reason is not None and self.tracker is not None:
            piece += self.tracker.finish()
        return piece, reason

    def result(self, reason: str, row: RowState | None, tokenizer: Any | None) -> GenerationOutput:
        """The request's output, ending for ``reason`` with ``row``'s tokens (none when it never ran)."""
        tokens = list(row.generated) if row is not None else []
        logprobs = list(row.logprobs) if row is not None else []
        text = None
        if tokenizer is not None:
            text = self.tracker.text if self.tracker is not None else tokenizer.decode(tokens)
        scores = self.prompt_scores
        return GenerationOutput(
            self.id, self.prompt, tokens, text, reason, logprobs if self.params.logprobs else None,
            float(sum(logprobs)), top_logprobs=self.top_logprobs if self.params.top_logprobs else None,
            prompt_logprobs=None if scores is None else [None, *scores.logprobs],
            prompt_top_logprobs=None if scores is None else [None, *scores.top],
            cached_tokens=self.cached, session_id=self.session_id,
        )


def prompt_tokens(prompt: str | Sequence[int], tokenizer: Any | None) -> list[int]:
    """The token ids of a prompt given as text or ids; raises :class:`UserError` for an empty one."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise UserError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
        tokens = tokenizer.encode(prompt)
    else:
        tokens = [int(t) for t in prompt]
    if not tokens:
        raise UserError("the prompt is empty; give at least one token")
    return tokens


def request_limits(tokens: list[int], params: SamplingParams, tokenizer: Any | None, vocab_size: int,
                   max_sequence_length: int, max_batch_size: int) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """``(max new tokens, bad word token sequences)`` of a request, or :class:`UserError` naming what cannot run."""
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        raise UserError(f"prompt token ids must lie in [0, {vocab_size})")
    if (params.stop or params.bad_words) and tokenizer is None:
        raise UserError("stop strings and bad words need a tokenizer; use stop_token_ids / bad_word_ids")
    room = max_sequence_length - len(tokens)
    if room < (params.max_new_tokens != 0):
        raise UserError(f"the prompt has {len(tokens)} tokens; the model reads at most "
                         f"{max_sequence_length - 1} to leave room for one new token "
                         f"({max_sequence_length} when only scoring it)")
    max_new = room if params.max_new_tokens is None else params.max_new_tokens
    if max_new > room:
        raise UserError(f"prompt ({len(tokens)} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                         f"sequence length {max_sequence_length}; lower max_new_tokens to {room} or less")
    if params.beam_width > max_batch_size:
        raise UserError(f"beam_width {params.beam_width} exceeds the engine's max_batch_size {max_batch_size}")
    bad_words = list(params.bad_word_ids)
    if params.bad_words:
        bad_words.extend(tuple(tokenizer.encode(word)) for word in params.bad_words)
    return max_new, tuple(w for w in bad_words if w)
