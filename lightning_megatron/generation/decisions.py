"""A step's decision: what the source rank chose for every row, which every rank then applies alike.

Only the source rank has the logits (see :class:`~lightning_megatron.generation.runner.ModelRunner`), so it alone
turns a step's choice into a :class:`Decision`: each row's token and log probability, read back at once, each beam
search's step, and the likeliest alternatives for requests that keep them. The ranks broadcast it, and
:class:`Applier` applies it identically on each (tokens taken, stop checks, beam rows reordered, requests ended), so
that all ranks of a replica agree on what runs next. Lookahead's decisions hold only the tokens and log probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lightning_megatron.generation.requests import Request
from lightning_megatron.generation.runner import ModelRunner
from lightning_megatron.generation.sampling import Choice, RowState, Sampler, beam_step
from lightning_megatron.generation.scoring import top_alternatives
from lightning_megatron.generation.stream import TokenEvent


@dataclass
class BeamDecision:
    """One step of one beam search: the beams that go on (each a parent row and its token) and those that ended."""

    parents: list[int]
    tokens: list[int]
    logprobs: list[float]
    ended: list[tuple[int, int, float]]
    """``(parent row, token, its log probability)`` of every hypothesis that ended at this step."""


@dataclass
class Decision:
    """One step's outcome for its requests' rows, in row order; the same on every rank once broadcast."""

    tokens: list[int]
    logprobs: list[float]
    beams: dict[int, BeamDecision] = field(default_factory=dict)
    """Per beam search request id: its step."""
    top_logprobs: dict[int, dict[int, float]] = field(default_factory=dict)
    """Per request id that keeps them: the most likely tokens at this step."""


def tokens_only(requests: Sequence[Request]) -> bool:
    """Whether a decision for ``requests`` is only each row's token and log probability (no beams, no alternatives),
    all that lookahead's asynchronous read-back carries."""
    return all(r.width == 1 and not r.params.top_logprobs for r in requests)


def decide(choice: Choice, logits: torch.Tensor, requests: list[Request]) -> Decision:
    """On the source rank: the chosen token of every row, each beam search's step and the top log probabilities."""
    # The one read-back of the step: the chosen tokens and their log probabilities, together.
    tokens, logprobs = torch.stack([choice.tokens.double(), choice.logprobs.double()]).tolist()
    decision = Decision([int(t) for t in tokens], logprobs)
    row = 0
    for request in requests:
        if request.width > 1:
            decision.beams[request.id] = _beam_decision(request, choice.constrained[row : row + request.width])
        if request.params.top_logprobs and request.max_new > 0:
            decision.top_logprobs[request.id] = top_alternatives(logits[row : row + 1].log_softmax(dim=-1),
                                                                 request.params.top_logprobs)[0]
        row += request.width
    return decision


def _beam_decision(request: Request, constrained: torch.Tensor) -> BeamDecision:
    """One beam search's step, from the constrained logits of its rows."""
    cumulative = ([sum(row.logprobs) for row in request.rows] if request.rows[0].generated
                  else [0.0] + [float("-inf")] * (request.width - 1))
    logprobs = constrained.log_softmax(dim=-1)
    step = beam_step(logprobs, cumulative, request.rows[0].end_ids, request.width, request.params.diversity_rate)
    return BeamDecision(step.parents, step.tokens, [logprobs[p, t].item() for p, t in zip(step.parents, step.tokens)],
                        [(p, t, logprobs[p, t].item()) for p, t, _ in step.ended])


class Applier:
    """Applies decisions to the requests they were made for, on every rank alike.

    ``sampler`` is ``None`` on ranks that do not choose tokens; ``finish(request, reason, row)`` ends a request with
    ``row``'s tokens.
    """

    def __init__(self, runner: ModelRunner, sampler: Sampler | None, use_cache: bool,
                 finish: Callable[[Request, str, RowState | None], None]) -> None:
        self.runner = runner
        self.sampler = sampler
        self.use_cache = use_cache
        self.finish = finish

    def apply(self, decision: Decision, requests: list[Request]) -> list[TokenEvent]:
        """Advance every request the step ran for (but those that ended meanwhile) by its decision; their events."""
        if self.use_cache and not self.runner.is_source:
            self.runner.set_tokens(requests[0].slot, decision.tokens)
        events = []
        offset = 0
        for request in requests:
            offset += request.width
            if request.id in decision.top_logprobs:
                request.top_logprobs.append(decision.top_logprobs[request.id])
            if request.output is not None:  # it ended while this step was in flight: its token is dropped
                continue
            if request.width == 1:
                events.append(self._advance(request, decision.tokens[offset - 1], decision.logprobs[offset - 1]))
            else:
                event = self._advance_beams(request, decision.beams[request.id])
                if event is not None:
                    events.append(event)
        return events

    def _advance(self, request: Request, token: int, logprob: float) -> TokenEvent:
        if request.max_new == 0:  # the prompt was only scored
            self.finish(request, "length", request.rows[0])
            return TokenEvent(request.id, None, "", True, "length")
        piece, reason = request.advance(token, logprob)
        if reason is not None:
            self.finish(request, reason, request.rows[0])
        top = request.top_logprobs[-1] if request.top_logprobs else None
        return TokenEvent(request.id, token, piece, reason is not None, reason, logprob, top)

    def _advance_beams(self, request: Request, step: BeamDecision) -> TokenEvent | None:
        alpha = request.params.length_penalty
        for parent, token, logprob in step.ended:
            hypothesis = request.rows[parent].fork()
            hypothesis.advance(token, logprob)
            request.hypotheses.append((sum(hypothesis.logprobs) / len(hypothesis.generated) ** alpha, hypothesis))
        new_rows = []
        for parent, token, logprob in zip(step.parents, step.tokens, step.logprobs):
            row = request.rows[parent].fork()
            row.advance(token, logprob)
            new_rows.append(row)
        if len(step.parents) == request.width:
            slots = list(range(request.slot, request.slot + request.width))
            self.runner.move_rows(slots, [request.slot + p for p in step.parents])
            self.runner.set_tokens(request.slot, step.tokens)
            if self.sampler is not None:
                self.sampler.reset(request.slot, new_rows)
        alive_done = not new_rows or len(new_rows[0].generated) >= request.max_new
        if alive_done or len(request.hypotheses) >= request.width or len(new_rows) < request.width:
            for row in new_rows:
                request.hypotheses.append((sum(row.logprobs) / len(row.generated) ** alpha, row))
            best = max(request.hypotheses, key=lambda item: item[0])[1]
            ended = bool(best.generated) and best.generated[-1] in best.end_ids
            self.finish(request, "stop" if ended else "length", best)
            text = request.output.text or ""
            return TokenEvent(request.id, None, text, True, request.output.finish_reason)
        request.rows = new_rows
        return None
