"""The generation engine: a batch of requests decoded together, requests joining and leaving between steps.

Every rank of a model replica runs the same engine in lockstep. Each step is either a *prefill* (the prompts of
newly admitted requests) or a *decode* (one token for every running sequence); the source rank (see
:class:`~lightning_megatron.generation.runner.ModelRunner`) chooses the tokens and broadcasts them, then every rank
applies them identically, so all ranks agree on which requests run, stop or leave.

The key/value cache is megatron's ``StaticInferenceContext``: one row per sequence ("slot"), and one write position
shared by all rows (the clock ``T``). A request joining at clock ``T`` writes its prompt into the positions just
before ``T``; an attention mask hides everything its row held before. Rotary embeddings depend only on distances,
and learned position embeddings are fed each sequence's own positions, so where a sequence sits in the cache does
not change its logits. Recompute mode (``use_cache=False``) runs the whole sequence every step through the same
masks and is the reference the cache is tested against.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from lightning_megatron.generation.params import SamplingParams
from lightning_megatron.generation.runner import ModelRunner
from lightning_megatron.generation.sampling import RowState, beam_step, choose, constrain, make_generator
from lightning_megatron.generation.scoring import TokenScores, score_tokens, top_alternatives
from lightning_megatron.generation.stream import TextTracker, TokenEvent


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

    @property
    def length(self) -> int:
        """The number of generated tokens."""
        return len(self.tokens)


@dataclass
class _Request:
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

    @property
    def width(self) -> int:
        return self.params.beam_width


class Engine:
    """Decodes many requests at once over a :class:`ModelRunner`; ranks of one model replica call it in lockstep.

    Call :meth:`submit` with the same requests on every rank (or, with ``leader_submits=True``, on global rank 0
    only: its new requests are broadcast at the start of each step), then :meth:`step` until :attr:`busy` is false.
    """

    def __init__(
        self,
        runner: ModelRunner,
        max_sequence_length: int,
        tokenizer: Any | None = None,
        max_batch_size: int = 16,
        cache_length: int | None = None,
        use_cache: bool = True,
        leader_submits: bool = False,
        eod: int | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.cache_length = max(cache_length or max_sequence_length, max_sequence_length)
        self.use_cache = use_cache
        self.leader_submits = leader_submits
        self.eod = eod if eod is not None else getattr(tokenizer, "eod", None)
        self.cache = runner.new_cache(max_batch_size, self.cache_length) if use_cache else None
        self.clock = 0
        self.active: list[_Request] = []
        self.pending: list[_Request] = []
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ids = itertools.count()
        self._arrived = threading.Event()
        self.finished: dict[int, GenerationOutput] = {}
        self.closed = False
        self._prefilled = False

    # ------------------------------------------------------------------ requests
    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running (or, for the leader, queued for the next step)."""
        return bool(self.active or self.pending or not self._inbox.empty())

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self.pending) + self._inbox.qsize()

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request (text or token ids); returns its id. Raises ``ValueError`` for input that cannot run."""
        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
            tokens = self.tokenizer.encode(prompt)
        else:
            tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.runner.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise ValueError("stop strings and bad words need a tokenizer; use stop_token_ids / bad_word_ids")
        room = self.max_sequence_length - len(tokens)
        if room < (params.max_new_tokens != 0):
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model reads at most "
                             f"{self.max_sequence_length - 1} to leave room for one new token "
                             f"({self.max_sequence_length} when only scoring it)")
        max_new = room if params.max_new_tokens is None else params.max_new_tokens
        if max_new > room:
            raise ValueError(f"prompt ({len(tokens)} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"sequence length {self.max_sequence_length}; lower max_new_tokens to {room} or less")
        if params.beam_width > self.max_batch_size:
            raise ValueError(f"beam_width {params.beam_width} exceeds the engine's max_batch_size "
                             f"{self.max_batch_size}")
        bad_words = list(params.bad_word_ids)
        if params.bad_words:
            bad_words.extend(tuple(self.tokenizer.encode(word)) for word in params.bad_words)
        request = _Request(next(self._ids), tokens, params, max_new, tuple(w for w in bad_words if w))
        self._post("add", request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (its output ends with finish reason ``"cancelled"``)."""
        self._post("cancel", request_id)

    def close(self) -> None:
        """Ask every rank to stop serving: :attr:`closed` becomes true at the next step."""
        self._post("close", None)

    def wait(self, timeout: float) -> None:
        """Block until a request arrives or ``timeout`` seconds pass (returns at once while busy)."""
        if not self.busy:
            self._arrived.wait(timeout)
        self._arrived.clear()

    def _post(self, kind: str, item: Any) -> None:
        self._inbox.put((kind, item))
        self._arrived.set()

    def _intake(self) -> list[TokenEvent]:
        messages: list[tuple[str, Any]] = []
        while not self._inbox.empty():
            messages.append(self._inbox.get_nowait())
        if self.leader_submits and self.runner.distributed and dist.get_world_size() > 1:
            box = [messages]
            dist.broadcast_object_list(box, src=0)
            messages = box[0]
        events = []
        for kind, item in messages:
            if kind == "add":
                self.pending.append(item)
            elif kind == "close":
                self.closed = True
            else:
                events.extend(self._cancel(item))
        return events

    def _cancel(self, request_id: int) -> list[TokenEvent]:
        for request in self.pending:
            if request.id == request_id:
                self.pending.remove(request)
                self._finish(request, "cancelled", None)
                return [TokenEvent(request.id, None, "", True, "cancelled")]
        for request in self.active:
            if request.id == request_id and request.output is None:
                self._finish(request, "cancelled", request.rows[0])
                return [TokenEvent(request.id, None, "", True, "cancelled")]
        return []

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (prefill) or advance every running sequence by one token (decode)."""
        events = self._intake()
        self._retire()
        # After a prefill the running sequences decode once before more requests are let in, so a steady stream of
        # arrivals cannot stall them.
        admitted = [] if self._prefilled and self.active else self._admit()
        self._prefilled = bool(admitted)
        if admitted:
            logits = self._prefill(admitted)
            requests = admitted
        elif self.active:
            logits = self._decode()
            requests = self.active
        else:
            return events
        decision = self.runner.broadcast(self._with_top_logprobs(self._decide(logits, requests), logits, requests)
                                         if self.runner.is_source else None)
        self._keep_top_logprobs(decision, requests)
        events.extend(self._apply(decision, requests))
        self._retire()
        return events

    def _admit(self) -> list[_Request]:
        """Take waiting requests in arrival order while they fit the free slots and the cache."""
        free = self.max_batch_size - sum(r.width for r in self.active)
        admitted: list[_Request] = []
        longest = 0
        for request in self.pending:
            if request.width > free:
                break
            if self.active:
                fits = len(request.prompt) <= self.clock and self.clock + request.max_new <= self.cache_length
            else:
                longest_with = max(longest, len(request.prompt))
                fits = all(longest_with + r.max_new <= self.cache_length for r in (*admitted, request))
            if not fits:
                break
            longest = max(longest, len(request.prompt))
            admitted.append(request)
            free -= request.width
        if not admitted:
            return []
        del self.pending[: len(admitted)]
        if not self.active:
            self.clock = longest
        slot = sum(r.width for r in self.active)
        for request in admitted:
            request.slot, request.start = slot, self.clock - len(request.prompt)
            slot += request.width
            request.rows = [self._row(request) for _ in range(request.width)]
            if self.tokenizer is not None and request.width == 1:
                request.tracker = TextTracker(self.tokenizer, request.params.stop)
        self.active.extend(admitted)
        return admitted

    def _row(self, request: _Request) -> RowState:
        p = request.params
        end_ids = set(p.stop_token_ids)
        if self.eod is not None and not p.ignore_eos:
            end_ids.add(self.eod)
        generator = make_generator(p.seed, self.runner.device) if self.runner.is_source and not p.greedy else None
        return RowState(p, request.prompt, end_ids=frozenset(end_ids), bad_words=request.bad_words,
                        generator=generator, top_p=p.top_p)

    def _rows(self, requests: Sequence[_Request]) -> list[tuple[_Request, RowState]]:
        return [(request, row) for request in requests for row in request.rows]

    def _layout(self, rows: list[tuple[_Request, RowState]], first: int, last: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Tokens and positions at cache positions ``[first, last)`` of ``rows``, and their mask over keys ``[0, last)``.

        A query sees the keys at or before it and not before its own sequence's start (older rows' leftovers); a
        padding query sees itself, so that no row of the attention is empty (SDPA turns those into NaN). When
        every sequence starts at 0 plain causal attention is the same, and no mask lets fused kernels run.
        """
        tokens = torch.zeros(len(rows), last - first, dtype=torch.long)
        for i, (request, row) in enumerate(rows):
            sequence = row.prompt + row.generated
            for position in range(max(first, request.start), last):
                tokens[i, position - first] = sequence[position - request.start]
        starts = torch.tensor([request.start for request, _ in rows])
        queries = torch.arange(first, last)
        positions = (queries[None, :] - starts[:, None]).clamp(min=0)
        if not starts.any():
            return tokens, positions, None
        keys = torch.arange(0, last)[None, None, :]
        blocked = (keys > queries[None, :, None]) | ((keys < starts[:, None, None]) & (keys != queries[None, :, None]))
        return tokens, positions, blocked[:, None]

    def _prefill(self, admitted: list[_Request]) -> torch.Tensor | None:
        rows = self._rows(admitted)
        scoring = any(r.params.prompt_logprobs is not None for r in admitted)
        if self.cache is None:
            first = 0
            tokens, positions, mask = self._layout(rows, 0, self.clock)
            logits = self.runner.forward(tokens, positions, mask)
        else:
            first = self.clock - max(len(r.prompt) for r in admitted)
            tokens, positions, mask = self._layout(rows, first, self.clock)
            self.cache.sequence_len_offset, self.cache.batch_size_offset = first, admitted[0].slot
            self.cache.enable_prefill_mode()
            # megatron keeps only the last position's logits unless told otherwise; scoring needs them all.
            self.cache.materialize_only_last_token_logits = not scoring
            try:
                logits = self.runner.forward(tokens, positions, mask, self.cache)
            finally:
                self.cache.batch_size_offset = 0
                self.cache.materialize_only_last_token_logits = True
        if scoring:
            self._score_prompts(admitted, logits, first)
        return self._last(logits)

    def _score_prompts(self, admitted: list[_Request], logits: torch.Tensor | None, first: int) -> None:
        """Every rank: the source scores the prompts of requests that asked (``logits`` cover cache positions from
        ``first``) and sends the scores to all ranks, which keep them on their requests."""
        scores: dict[int, TokenScores] | None = None
        if self.runner.is_source:
            scores, row = {}, 0
            for request in admitted:
                if request.params.prompt_logprobs is not None:
                    positions = logits[row, request.start - first : self.clock - first - 1]
                    scores[request.id] = score_tokens(positions, request.prompt[1:], request.params.prompt_logprobs)
                row += request.width
        scores = self.runner.broadcast(scores)
        for request in admitted:
            request.prompt_scores = scores.get(request.id)

    def _decode(self) -> torch.Tensor | None:
        rows = self._rows(self.active)
        self.clock += 1
        if self.cache is None:
            tokens, positions, mask = self._layout(rows, 0, self.clock)
            return self._last(self.runner.forward(tokens, positions, mask))
        tokens, positions, mask = self._layout(rows, self.clock - 1, self.clock)
        self.cache.sequence_len_offset, self.cache.batch_size_offset = self.clock - 1, 0
        self.cache.enable_decode_mode()
        return self._last(self.runner.forward(tokens, positions, mask, self.cache))

    @staticmethod
    def _last(logits: torch.Tensor | None) -> torch.Tensor | None:
        return None if logits is None else logits[:, -1]

    # ------------------------------------------------------------------ choosing and applying tokens
    def _with_top_logprobs(self, decision: dict[str, Any], logits: torch.Tensor, requests: list[_Request]
                           ) -> dict[str, Any]:
        """On the source rank: add the most likely tokens of the rows whose requests keep them to ``decision``."""
        top: dict[int, dict[int, float]] = {}
        row = 0
        for request in requests:
            if request.params.top_logprobs and request.max_new > 0:
                top[request.id] = top_alternatives(logits[row : row + 1].log_softmax(dim=-1),
                                                   request.params.top_logprobs)[0]
            row += request.width
        if top:
            decision["top_logprobs"] = top
        return decision

    def _keep_top_logprobs(self, decision: dict[str, Any], requests: list[_Request]) -> None:
        for request in requests:
            if request.id in decision.get("top_logprobs", {}):
                request.top_logprobs.append(decision["top_logprobs"][request.id])

    def _decide(self, logits: torch.Tensor, requests: list[_Request]) -> dict[str, Any]:
        """On the source rank: the next token of every sampled row, and each beam search's step."""
        rows = self._rows(requests)
        states = [row for _, row in rows]
        logprobs = logits.log_softmax(dim=-1)
        constrained = constrain(logits, states)
        tokens = choose(constrained, states).tolist()
        decision: dict[str, Any] = {"tokens": tokens,
                                    "logprobs": logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])
                                    .squeeze(1).tolist(),
                                    "beams": {}}
        offset = 0
        for request in requests:
            if request.width > 1:
                span = slice(offset, offset + request.width)
                cumulative = ([sum(row.logprobs) for row in request.rows] if request.rows[0].generated
                              else [0.0] + [float("-inf")] * (request.width - 1))
                beam_logprobs = constrained[span].log_softmax(dim=-1)
                choice = beam_step(beam_logprobs, cumulative, request.rows[0].end_ids, request.width)
                decision["beams"][request.id] = {
                    "parents": choice.parents, "tokens": choice.tokens,
                    "logprobs": [beam_logprobs[p, t].item() for p, t in zip(choice.parents, choice.tokens)],
                    "ended": [(p, t, beam_logprobs[p, t].item()) for p, t, _ in choice.ended],
                }
            offset += request.width
        return decision

    def _apply(self, decision: dict[str, Any], requests: list[_Request]) -> list[TokenEvent]:
        events = []
        offset = 0
        for request in requests:
            if request.width == 1:
                token, logprob = decision["tokens"][offset], decision["logprobs"][offset]
                events.append(self._advance(request, token, logprob))
            else:
                event = self._advance_beams(request, decision["beams"][request.id])
                if event is not None:
                    events.append(event)
            offset += request.width
        return events

    def _advance(self, request: _Request, token: int, logprob: float) -> TokenEvent:
        row = request.rows[0]
        if request.max_new == 0:  # the prompt was only scored
            self._finish(request, "length", row)
            return TokenEvent(request.id, None, "", True, "length")
        row.advance(token, logprob)
        piece, stopped = ("", False)
        if request.tracker is not None:
            piece, stopped = request.tracker.update(row.generated)
        reason = None
        if stopped or token in row.end_ids:
            reason = "stop"
        elif len(row.generated) >= request.max_new:
            reason = "length"
        if reason is not None:
            if request.tracker is not None:
                piece += request.tracker.finish()
            self._finish(request, reason, row)
        top = request.top_logprobs[-1] if request.top_logprobs else None
        return TokenEvent(request.id, token, piece, reason is not None, reason, logprob, top)

    def _advance_beams(self, request: _Request, step: dict[str, Any]) -> TokenEvent | None:
        alpha = request.params.length_penalty
        for parent, token, logprob in step["ended"]:
            hypothesis = request.rows[parent].fork()
            hypothesis.advance(token, logprob)
            request.hypotheses.append((sum(hypothesis.logprobs) / len(hypothesis.generated) ** alpha, hypothesis))
        parents = step["parents"]
        new_rows = []
        for parent, token, logprob in zip(parents, step["tokens"], step["logprobs"]):
            row = request.rows[parent].fork()
            row.advance(token, logprob)
            new_rows.append(row)
        if self.cache is not None and len(parents) == request.width:
            slots = range(request.slot, request.slot + request.width)
            self.runner.move_rows(self.cache, list(slots), [request.slot + p for p in parents])
        alive_done = not new_rows or len(new_rows[0].generated) >= request.max_new
        if alive_done or len(request.hypotheses) >= request.width or len(new_rows) < request.width:
            for row in new_rows:
                request.hypotheses.append((sum(row.logprobs) / len(row.generated) ** alpha, row))
            best = max(request.hypotheses, key=lambda item: item[0])[1]
            ended = bool(best.generated) and best.generated[-1] in best.end_ids
            self._finish(request, "stop" if ended else "length", best)
            text = request.output.text or ""
            return TokenEvent(request.id, None, text, True, request.output.finish_reason)
        request.rows = new_rows
        return None

    def _finish(self, request: _Request, reason: str, row: RowState | None) -> None:
        tokens = list(row.generated) if row is not None else []
        logprobs = list(row.logprobs) if row is not None else []
        text = None
        if self.tokenizer is not None:
            text = request.tracker.text if request.tracker is not None else self.tokenizer.decode(tokens)
        scores = request.prompt_scores
        request.output = GenerationOutput(
            request.id, request.prompt, tokens, text, reason, logprobs if request.params.logprobs else None,
            float(sum(logprobs)), top_logprobs=request.top_logprobs if request.params.top_logprobs else None,
            prompt_logprobs=None if scores is None else [None, *scores.logprobs],
            prompt_top_logprobs=None if scores is None else [None, *scores.top],
        )
        self.finished[request.id] = request.output

    def _retire(self) -> None:
        """Free the slots of finished requests and close the gaps (copying cache rows down)."""
        if not any(r.output is not None for r in self.active):
            return
        kept = [r for r in self.active if r.output is None]
        dst, src = [], []
        slot = 0
        for request in kept:
            if request.slot != slot:
                dst.extend(range(slot, slot + request.width))
                src.extend(range(request.slot, request.slot + request.width))
                request.slot = slot
            slot += request.width
        if self.cache is not None:
            self.runner.move_rows(self.cache, dst, src)
        self.active = kept
        if not kept:
            self.clock = 0

    # ------------------------------------------------------------------ conveniences
    def generate(self, prompts: Iterable[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 streamer: Callable[[TokenEvent], Any] | None = None) -> list[GenerationOutput]:
        """Run ``prompts`` to completion (all ranks call it with the same arguments); outputs in prompt order.

        ``streamer`` (e.g. a :class:`~lightning_megatron.generation.stream.TextStreamer`) gets every event.
        """
        prompts = list(prompts)
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        ids = [self.submit(prompt, p) for prompt, p in zip(prompts, per_prompt)]
        with self.runner.inference_mode():
            while any(i not in self.finished for i in ids):
                for event in self.step():
                    if streamer is not None:
                        streamer(event)
        return [self.finished.pop(i) for i in ids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yield each step's event of one request as it is produced (all ranks iterate it together)."""
        request_id = self.submit(prompt, params)
        with self.runner.inference_mode():
            while request_id not in self.finished:
                for event in self.step():
                    if event.request_id == request_id:
                        yield event
        self.finished.pop(request_id)
