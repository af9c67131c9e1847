"""SamplingParams: how one request is decoded (each request of a batch has its own)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lightning_megatron.errors import UserError


@dataclass
class SamplingParams:
    """Decoding settings of one request; the defaults decode greedily for 64 tokens."""

    max_new_tokens: int | None = 64
    """Tokens to generate at most; ``None`` means up to the model's sequence length, 0 only scores the prompt."""
    min_new_tokens: int = 0
    """End-of-document and stop token ids are blocked until this many tokens exist."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``."""
    top_p_decay: float = 1.0
    """After each token ``top_p`` is multiplied by this (factual-nucleus sampling) ..."""
    top_p_min: float = 0.0
    """... but never below this floor."""
    top_p_reset_ids: tuple[int, ...] = ()
    """Generating one of these tokens (e.g. a full stop) restores the initial ``top_p``."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens already in the prompt or the output."""
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens already generated (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted from the logits once per earlier occurrence in the output (OpenAI semantics)."""
    seed: int | None = None
    """Seeds this request's own random generator: the same seed gives the same text in any batch."""
    stop: tuple[str, ...] = ()
    """Stop strings: the output ends before the first one (needs a tokenizer)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the output (kept in ``tokens``, dropped from ``text``)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-document token."""
    bad_words: tuple[str, ...] = ()
    """Strings never to generate (encoded with the tokenizer)."""
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    """Token sequences never to generate: the last token is blocked whenever the rest has just been generated."""
    beam_width: int = 1
    """Beam search with this many beams when > 1 (deterministic; temperature/top-k/top-p are ignored)."""
    length_penalty: float = 1.0
    """Beam scores are cumulative log probabilities divided by ``length ** length_penalty``."""
    diversity_rate: float = 0.0
    """Beam search: the k-th best continuation of each beam ranks as if ``k * diversity_rate`` lower, so the beams
    spread over more parents (FasterTransformer's ``beam_search_diversity_rate``)."""
    logprobs: bool = False
    """Return the log probability of every generated token (always computed; this only keeps them)."""
    top_logprobs: int = 0
    """Also keep this many most likely tokens (id -> log probability) at each generated token."""
    prompt_logprobs: int | None = None
    """Return the log probability of every prompt token after the first, with this many most likely tokens at each
    position (``None``: do not score the prompt)."""

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids", "bad_words", "top_p_reset_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            setattr(self, name, tuple(value or ()))
        self.bad_word_ids = tuple(tuple(int(t) for t in words) for words in self.bad_word_ids or ())

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the accepted range for any setting that cannot work."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        check(self.max_new_tokens is None or self.max_new_tokens >= 0,
              "max_new_tokens must be >= 0 (0 scores the prompt only; None: up to the sequence length)")
        check(self.min_new_tokens >= 0, "min_new_tokens must be >= 0")
        check(self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
              "min_new_tokens must not exceed max_new_tokens")
        check(self.temperature >= 0.0, "temperature must be >= 0 (0 means greedy)")
        check(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        check(0.0 < self.top_p_decay <= 1.0, "top_p_decay must be in (0, 1]")
        check(0.0 <= self.top_p_min <= 1.0, "top_p_min must be in [0, 1]")
        check(self.repetition_penalty > 0.0, "repetition_penalty must be > 0 (1 disables it)")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        check(self.beam_width >= 1, "beam_width must be >= 1")
        check(self.diversity_rate >= 0.0, "diversity_rate must be >= 0 (0 disables it)")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        check(all(len(w) > 0 for w in self.bad_word_ids), "bad_word_ids entries must be non-empty")
        check(self.top_logprobs >= 0, "top_logprobs must be >= 0")
        check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs must be >= 0 (or None)")
        if self.beam_width > 1:
            check(not self.stop, "stop strings are not supported with beam search; use stop_token_ids")
            check(self.top_logprobs == 0, "top_logprobs are not kept for beam search; set beam_width to 1")
            check(self.max_new_tokens != 0, "max_new_tokens=0 scores the prompt only; set beam_width to 1")

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)
