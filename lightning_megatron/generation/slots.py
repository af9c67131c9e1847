"""Which requests hold which rows ("slots") of the key/value cache, and where in its row each sequence sits.

The engine's cache (:class:`~lightning_megatron.generation.kv_cache.KVCache`) has one row per sequence and one write
position that all rows share, the clock. Requests wait in arrival order until enough rows are free (one per beam) and
their prompt and new tokens fit before the cache's end; a prompt admitted at clock ``T`` fills the positions just
before ``T`` (its request's ``start`` is where it begins), and the cache's per-row ``valid`` cells hide whatever the
row held before. Finished requests leave between steps and the rows after them move down (cache, next tokens,
sampling state), so the running requests hold rows ``[0, n)`` in order. The same layout gives the inputs of a
prefill and, without a cache, of a forward pass over whole sequences. Every rank keeps this bookkeeping alike; it
stands apart from the engine's stepping so that either can be read without the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lightning_megatron.generation.requests import Request
from lightning_megatron.generation.runner import ModelRunner
from lightning_megatron.generation.sampling import RowState, Sampler, new_seed
from lightning_megatron.generation.sessions import SessionStore
from lightning_megatron.generation.stream import TextTracker


def rows_of(requests: Sequence[Request]) -> list[tuple[Request, RowState]]:
    """Every row of ``requests`` (a request has one per beam) with its request, in cache order."""
    return [(request, row) for request in requests for row in request.rows]


def layout(rows: list[tuple[Request, RowState]], first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and each sequence's own positions at cache positions ``[first, last)`` of ``rows`` (0 before a
    sequence's start)."""
    tokens = torch.zeros(len(rows), last - first, dtype=torch.long)
    for i, (request, row) in enumerate(rows):
        sequence = row.prompt + row.generated
        begin = max(first, request.start)
        if begin < last:
            tokens[i, begin - first :] = torch.tensor(sequence[begin - request.start : last - request.start])
    starts = torch.tensor([request.start for request, _ in rows])
    positions = (torch.arange(first, last)[None, :] - starts[:, None]).clamp(min=0)
    return tokens, positions


@dataclass(eq=False)
class Slots:
    """The waiting and the running requests of an engine, the cache rows the running ones hold, and the clock."""

    runner: ModelRunner
    sampler: Sampler | None
    """``None`` on ranks that do not choose tokens."""
    sessions: SessionStore
    max_batch_size: int
    cache_length: int
    tokenizer: Any | None
    """Gives one-row requests their text (optional)."""
    eod: int | None
    """Ends every sequence that does not ignore it."""
    pending: list[Request] = field(default_factory=list)
    """Requests waiting for rows, in arrival order."""
    active: list[Request] = field(default_factory=list)
    """Running requests, in the order of their rows."""
    clock: int = 0
    """The cache position the next step writes (every row's)."""

    def admissible(self) -> list[Request]:
        """The waiting requests, in arrival order, that fit the free slots and the cache now."""
        free = self.max_batch_size - sum(r.width for r in self.active)
        admitted: list[Request] = []
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
        return admitted

    def admit(self) -> list[Request]:
        """Take the admissible waiting requests into free slots, restoring the cached turns of sessions."""
        admitted = self.admissible()
        if not admitted:
            return []
        del self.pending[: len(admitted)]
        longest = max(len(request.prompt) for request in admitted)
        if not self.active:
            self.clock = self.runner.prefill_width(longest, self.cache_length - max(r.max_new for r in admitted))
        slot = sum(r.width for r in self.active)
        for request in admitted:
            request.slot, request.start = slot, self.clock - len(request.prompt)
            slot += request.width
            request.rows = [self._row(request) for _ in range(request.width)]
            if request.cached:
                self.runner.restore_row(request.slot, self.sessions.take(request.session_id), request.start)
            if self.sampler is not None:
                self.sampler.reset(request.slot, request.rows)
            if self.tokenizer is not None and request.width == 1:
                request.tracker = TextTracker(self.tokenizer, request.params.stop)
        self.active.extend(admitted)
        return admitted

    def _row(self, request: Request) -> RowState:
        p = request.params
        end_ids = set(p.stop_token_ids)
        if self.eod is not None and not p.ignore_eos:
            end_ids.add(self.eod)
        return RowState(p, request.prompt, end_ids=frozenset(end_ids), bad_words=request.bad_words,
                        seed=new_seed(p.seed), top_p=p.top_p)

    def retire(self) -> None:
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
        self.runner.move_rows(dst, src)
        if self.sampler is not None:
            self.sampler.move_rows(dst, src)
        self.active = kept
        if not kept:
            self.clock = 0

    def prefill_start(self, admitted: list[Request]) -> int:
        """The first cache position a prefill of the just ``admitted`` requests computes (it ends at the clock)."""
        # A fresh batch fills positions [0, clock) (the clock may be padded for a graphed prefill); a batch joining
        # running sequences, or continuing sessions, computes only as far back as its longest uncached prompt.
        fresh = admitted[0].slot == 0 and not any(r.cached for r in admitted)
        return self.clock - (self.clock if fresh else max(len(r.prompt) - r.cached for r in admitted))

    def keep_session(self, request: Request, row: RowState | None, step: int) -> None:
        """Save a finished session request's keys/values (its row's cells: every token but the last generated one)."""
        if row is None or request.slot < 0:
            self.sessions.keep(request.session_id, None, None, step)
            return
        # Not up to the clock: under lookahead the clock may already be a step ahead of this request's last token.
        end = request.start + len(request.prompt) + len(row.generated) - 1
        saved = self.runner.save_row(request.slot, request.start, end)
        self.sessions.keep(request.session_id, request.prompt + row.generated, saved, step)

    def whole_sequences(self, rows: list[tuple[Request, RowState]]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Tokens, positions and attention mask of ``rows``' whole sequences up to the clock (no cache).

        A query sees the keys at or before it and not before its own sequence's start (older rows' leftovers); a
        padding query sees itself, so that no row of the attention is empty. When every sequence starts at 0 plain
        causal attention is the same, and no mask lets fused kernels run.
        """
        tokens, positions = layout(rows, 0, self.clock)
        starts = torch.tensor([request.start for request, _ in rows])
        mask = None
        if starts.any():
            queries = torch.arange(self.clock)
            keys = queries[None, None, :]
            mask = (keys > queries[None, :, None]) | ((keys < starts[:, None, None]) & (keys != queries[None, :, None]))
            mask = mask[:, None]
        return tokens, positions, mask
