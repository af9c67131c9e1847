"""The generation engine: a batch of requests decoded together, requests joining and leaving between steps.

Every rank of a model replica runs the same engine in lockstep. Each step is either a *prefill* (the prompts of
newly admitted requests) or a *decode* (one token for every running sequence); the source rank (see
:class:`~lightning_megatron.generation.runner.ModelRunner`) chooses the tokens on the device and broadcasts them,
then every rank applies them identically (:mod:`~lightning_megatron.generation.decisions`), so all ranks agree on
which requests run, stop or leave. Requests reach the loop through an
:class:`~lightning_megatron.generation.inbox.Inbox`.

The key/value cache has one row per sequence ("slot") and one write position shared by all rows (the clock);
:class:`~lightning_megatron.generation.slots.Slots` keeps which requests hold which rows and where each sequence
starts. Each sequence is fed its own positions (learned and rotary embeddings alike), so where it sits in the cache
does not change its logits. A decode step reads its inputs (the tokens just chosen, each row's position) from device
buffers, which is what lets it replay from a CUDA graph. Recompute mode (``use_cache=False``) runs the whole sequence
every step through plain masked attention and is the reference the cache is tested against.

*Lookahead* keeps the device busy while the host reads tokens back: a step's tokens are chosen on the device and
become the next step's inputs there, so the next decode step is launched before this step's tokens reach the host
(one step in flight). Reading them back then waits only for their own step, and the host's bookkeeping (stop checks,
text, events) overlaps the next step's kernels. A request that ends at a step has had one more token computed for it,
which is dropped; nothing else changes, so lookahead gives the tokens the plain loop gives. It runs for batches whose
choices need no host round trip before the next step: no beams, no top log probabilities, no decaying nucleus,
bad words of one token, past ``min_new_tokens``; other batches step without it.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from lightning_megatron.errors import UserError
from lightning_megatron.generation.decisions import Applier, Decision, decide, tokens_only
from lightning_megatron.generation.inbox import Inbox
from lightning_megatron.generation.params import SamplingParams
from lightning_megatron.generation.readback import InFlight, ReadBack
from lightning_megatron.generation.requests import GenerationOutput, Request, prompt_tokens, request_limits
from lightning_megatron.generation.runner import ModelRunner
from lightning_megatron.generation.sampling import Choice, RowState, Sampler
from lightning_megatron.generation.sessions import SessionStore
from lightning_megatron.generation.scoring import prefill_scores
from lightning_megatron.generation.slots import Slots, layout, rows_of
from lightning_megatron.generation.stream import TokenEvent


class Engine:
    """Decodes many requests at once over a :class:`ModelRunner`; ranks of one model replica call it in lockstep.

    Call :meth:`submit` with the same requests on every rank (or, with ``leader_submits=True``, on global rank 0
    only: its new requests are broadcast at the start of each step), then :meth:`step` until :attr:`busy` is false.
    With data-parallel replicas and ``leader_submits``, every rank of every replica steps together; each engine takes
    only the requests submitted for its ``replica`` (sessions live in replica 0, the leader's).

    A request with a ``session_id`` continues that conversation: its prompt holds only the new text, the keys and
    values of the earlier turns (prompts and generated tokens) are reused, and the result is what the whole
    conversation as one prompt gives. Sessions end with :meth:`end_session`, after ``session_ttl`` idle seconds, or,
    least recently used first, when the sessions together hold more than ``session_tokens`` cached tokens (default:
    as many as the cache has cells).

    ``lookahead`` launches each decode step before the previous step's tokens are read back (see the module's
    docstring); default: on for a CUDA model held by one process. It needs the cache and one process per replica.
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
        session_ttl: float = 600.0,
        session_tokens: int | None = None,
        replica: int = 0,
        lookahead: bool | None = None,
    ) -> None:
        self.runner = runner
        self.replica = replica
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.cache_length = max(cache_length or max_sequence_length, max_sequence_length)
        self.use_cache = use_cache
        self.leader_submits = leader_submits
        self.eod = eod if eod is not None else getattr(tokenizer, "eod", None)
        if use_cache:
            runner.allocate(max_batch_size, self.cache_length)
        self.sampler = Sampler(max_batch_size, runner.vocab_size, runner.device) if runner.is_source else None
        self._inbox = Inbox()
        self._ids = itertools.count()
        self.finished: dict[int, GenerationOutput] = {}
        self.closed = False
        self._prefilled = False
        self.sessions = SessionStore(session_ttl, max_batch_size * self.cache_length if session_tokens is None
                                     else session_tokens)
        self.slots = Slots(runner, self.sampler, self.sessions, max_batch_size, self.cache_length, tokenizer, self.eod)
        self._applier = Applier(runner, self.sampler, use_cache, self._finish)
        self._steps = 0
        single = runner.tp_size == runner.pp_size == runner.cp_size == 1
        if lookahead and not (single and use_cache):
            raise ValueError("lookahead=True needs the cache (use_cache=True) and a model replica held by one process "
                             "(tensor, pipeline and context parallel size 1)")
        self.lookahead = single and use_cache and runner.device.type == "cuda" if lookahead is None else lookahead
        self._in_flight: InFlight[Request] | None = None
        self._read_back = ReadBack(max_batch_size, runner.device)

    # ------------------------------------------------------------------ requests
    @property
    def active(self) -> list[Request]:
        """The running requests, in the order of the cache rows they hold."""
        return self.slots.active

    @property
    def pending(self) -> list[Request]:
        """The requests waiting for cache rows, in arrival order."""
        return self.slots.pending

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running (or, for the leader, queued for the next step)."""
        return bool(self.active or self.pending or self._inbox)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self.pending) + len(self._inbox)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               session_id: str | None = None, replica: int = 0) -> int:
        """Queue a request (text or token ids) for the engine of data-parallel ``replica``; returns its id. Raises
        :class:`~lightning_megatron.errors.UserError` (a ``ValueError``) for input that cannot run.

        With ``session_id`` the prompt continues that session's conversation (a new id starts one); sessions run in
        replica 0.
        """
        if session_id is not None and replica != 0:
            raise UserError("sessions are kept by replica 0 (the leader's); submit session requests there")
        params = params or SamplingParams()
        params.validate()
        tokens = prompt_tokens(prompt, self.tokenizer)
        cached = 0
        if session_id is not None:
            if not self.use_cache:
                raise UserError("sessions keep keys/values: they need the engine's cache (use_cache=True)")
            if params.beam_width > 1:
                raise UserError("beam search cannot continue a session; set beam_width to 1 or drop session_id")
            tokens, cached = self.sessions.begin(session_id, tokens)
            if cached and params.prompt_logprobs is not None:
                raise UserError("prompt log probabilities need the whole prompt computed; they cannot continue a "
                                 "session (drop session_id or prompt_logprobs)")
        max_new, bad_words = request_limits(tokens, params, self.tokenizer, self.runner.vocab_size,
                                            self.max_sequence_length, self.max_batch_size)
        request = Request(next(self._ids), tokens, params, max_new, bad_words, session_id=session_id, cached=cached,
                          replica=replica)
        if session_id is not None:
            self.sessions.hold(session_id)
        self._inbox.post("add", request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (its output ends with finish reason ``"cancelled"``)."""
        self._inbox.post("cancel", request_id)

    def close(self) -> None:
        """Ask every rank to stop serving: :attr:`closed` becomes true at the next step."""
        self._inbox.post("close", None)

    def end_session(self, session_id: str) -> None:
        """Forget a session and free its cached keys/values (once a request of it running now finishes)."""
        self.sessions.end(session_id)
        self._inbox.post("end_session", session_id)  # the other ranks end it at their next intake

    def wait(self, timeout: float) -> None:
        """Block until a request arrives or ``timeout`` seconds pass (returns at once while busy)."""
        self._inbox.wait(0.0 if self.busy else timeout)

    def _intake(self) -> list[TokenEvent]:
        events = []
        for kind, item in self._inbox.take(self.leader_submits and self.runner.distributed
                                           and dist.get_world_size() > 1):
            if kind == "add":
                if item.replica != self.replica:
                    continue
                if item.session_id is not None:  # the leader held it when it was submitted; the others now
                    self.sessions.hold(item.session_id)
                self.pending.append(item)
            elif kind == "close":
                self.closed = True
            elif kind == "end_session":
                self.sessions.end(item)
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
        self._steps += 1
        self._expire_sessions()
        events = self._intake()
        self.slots.retire()
        if self._in_flight is not None and all(r.output is not None for r in self._in_flight.requests):
            self._in_flight = None  # every request it ran for has ended: its tokens are not needed
        if self._in_flight is not None:
            in_flight = self._in_flight
            self._prefilled = False
            self._in_flight = self._launch_decode() if self._may_look_ahead() else None
            events.extend(self._commit(in_flight))
            self.slots.retire()
            return events
        # After a prefill the running sequences decode once before more requests are let in, so a steady stream of
        # arrivals cannot stall them.
        admitted = [] if self._prefilled and self.active else self.slots.admit()
        self._prefilled = bool(admitted)
        if admitted:
            logits = self._prefill(admitted)
            requests = admitted
        elif self.active:
            logits = self._decode()
            requests = self.active
        else:
            return events
        if self.lookahead and tokens_only(requests):
            choice = self._choose(logits, requests)
            in_flight = self._read_back.start(choice.tokens, choice.logprobs, requests)
            self._in_flight = self._launch_decode() if self._may_look_ahead() else None
            events.extend(self._commit(in_flight))
        else:
            decision = self.runner.broadcast(decide(self._choose(logits, requests), logits, requests)
                                             if self.runner.is_source else None)
            events.extend(self._applier.apply(decision, requests))
        self.slots.retire()
        return events

    # ------------------------------------------------------------------ lookahead
    def _may_look_ahead(self) -> bool:
        """Whether the next decode step can be launched before the host knows this step's tokens.

        The host's view of each row is then one token behind, so the next choice must not depend on it: no
        decaying nucleus, no bad word longer than one token, ``min_new_tokens`` already reached. Some sequence
        must go on after this step (by length; one that stops on a token has one token too many computed, dropped),
        and no waiting request may be admissible (it is let in first).
        """
        if not self.active or not tokens_only(self.active) or self.slots.admissible():
            return False
        for request in self.active:
            row, p = request.rows[0], request.params
            if p.top_p_decay < 1.0 or any(len(w) > 1 for w in request.bad_words) or \
                    len(row.generated) < p.min_new_tokens:
                return False
        going_on = any(len(r.rows[0].generated) + 1 < r.max_new for r in self.active)
        return going_on and self.slots.clock < self.cache_length

    def _launch_decode(self) -> InFlight[Request]:
        """Run a decode step of the running rows and choose their tokens, all on the device; the read-back is queued."""
        requests = list(self.active)
        choice = self._choose(self._decode(), requests)
        return self._read_back.start(choice.tokens, choice.logprobs, requests)

    def _commit(self, in_flight: InFlight[Request]) -> list[TokenEvent]:
        """Wait for an in-flight step's tokens (only for its own kernels) and apply them to its requests."""
        tokens, logprobs = in_flight.wait()
        return self._applier.apply(Decision(tokens, logprobs), in_flight.requests)

    # ------------------------------------------------------------------ the model's steps
    def _prefill(self, admitted: list[Request]) -> torch.Tensor | None:
        rows = rows_of(admitted)
        scoring = any(r.params.prompt_logprobs is not None for r in admitted)
        if not self.use_cache:
            first = 0
            logits = self._recompute(rows, all_positions=scoring)
        else:
            first, clock = self.slots.prefill_start(admitted), self.slots.clock
            tokens, positions = layout(rows, first, clock)
            logits = self.runner.prefill(admitted[0].slot, tokens, positions, [request.start for request, _ in rows],
                                         clock, all_positions=scoring)
        if not scoring:
            return logits
        # The source scores the prompts of the requests that asked; every rank keeps the scores on its requests.
        scores = self.runner.broadcast(prefill_scores(admitted, logits, first, self.slots.clock)
                                       if self.runner.is_source else None)
        for request in admitted:
            request.prompt_scores = scores.get(request.id)
        return self._last(logits)

    def _decode(self) -> torch.Tensor | None:
        rows = rows_of(self.active)
        if not self.use_cache:
            self.slots.clock += 1
            return self._recompute(rows)
        logits = self.runner.decode(len(rows), self.slots.clock)
        self.slots.clock += 1
        return logits

    def _recompute(self, rows: list[tuple[Request, RowState]], all_positions: bool = False) -> torch.Tensor | None:
        """Logits of the last position of every row (of every position with ``all_positions``), from the whole
        sequences (no cache)."""
        logits = self.runner.forward(*self.slots.whole_sequences(rows))
        return logits if all_positions else self._last(logits)

    @staticmethod
    def _last(logits: torch.Tensor | None) -> torch.Tensor | None:
        return None if logits is None else logits[:, -1]

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> Choice:
        """On the source rank, on the device: every row's next token, which becomes the row's next input."""
        rows = rows_of(requests)
        first = requests[0].slot
        choice = self.sampler.choose(logits, first, [row for _, row in rows])
        if self.use_cache:
            self.runner.tokens[first : first + len(rows)] = choice.tokens
        self.sampler.record(first, choice.tokens)
        return choice

    # ------------------------------------------------------------------ finished requests and sessions
    def _finish(self, request: Request, reason: str, row: RowState | None) -> None:
        request.output = request.result(reason, row, self.tokenizer)
        self.finished[request.id] = request.output
        if request.session_id is not None:
            self.slots.keep_session(request, row, self._steps)

    def _expire_sessions(self) -> None:
        """On the rank that takes requests: end sessions idle for longer than their time to live (all ranks follow)."""
        leader = not (self.runner.distributed and dist.get_world_size() > 1) or (
            self.leader_submits and dist.get_rank() == 0)
        if leader:
            for key in self.sessions.expired():
                self.end_session(key)

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
            raise UserError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
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
