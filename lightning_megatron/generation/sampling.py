"""Turning next-token logits into tokens on the device: penalties and constraints, then greedy or sampled choice.

Every step works on a batch of rows whose requests may each use other settings. The choice runs on the logits'
device in a fixed number of batched operations, whatever the batch holds; the host reads back one small tensor per
step (the chosen tokens and their log probabilities).

Random draws are Gumbel-max draws whose noise is a hash of (the request's seed, how many tokens the row has drawn,
the token id): no generator state, so a seeded request samples the same tokens whatever else shares its batch, on
any device layout, and a draw costs the same batched operations as greedy decoding.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from lightning_megatron.generation.params import SamplingParams


@dataclass
class RowState:
    """What choosing the next token of one sequence needs to know about it (on the host)."""

    params: SamplingParams
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    end_ids: frozenset[int] = frozenset()
    """Tokens that end the sequence (end-of-document unless ignored, stop token ids)."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    seed: int = 0
    """The request's seed (a random one when it set none)."""
    top_p: float = 1.0
    """The current nucleus, which decays as tokens are generated."""
    logprobs: list[float] = field(default_factory=list)
    """The model's log probability of each generated token."""

    def fork(self) -> "RowState":
        """A copy (a beam taking over another's history)."""
        return RowState(self.params, self.prompt, list(self.generated), self.end_ids, self.bad_words, self.seed,
                        self.top_p, list(self.logprobs))

    def advance(self, token: int, logprob: float) -> None:
        """Record a generated token (and its log probability); update the decaying nucleus."""
        self.generated.append(token)
        self.logprobs.append(logprob)
        p = self.params
        if token in p.top_p_reset_ids:
            self.top_p = p.top_p
        elif p.top_p_decay < 1.0:
            self.top_p = max(self.top_p * p.top_p_decay, p.top_p_min)

    @property
    def penalised(self) -> bool:
        """Whether this row's logits depend on the tokens it has seen."""
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def new_seed(seed: int | None) -> int:
    """The seed of a request: its own, or a fresh random one."""
    return secrets.randbits(62) if seed is None else int(seed)


@dataclass
class Choice:
    """One step's choice for a batch of rows (device tensors)."""

    tokens: Tensor
    logprobs: Tensor
    """The model's log probability of each chosen token (before penalties and constraints)."""
    constrained: Tensor
    """The logits after penalties and constraints (beam search ranks these)."""


class Sampler:
    """Chooses tokens for rows of the engine's cache; keeps each row's draw count and seen tokens on the device."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.drawn = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen: Tensor | None = None
        """``[rows, vocab]`` bool: tokens of the prompt or the output (repetition penalty); allocated on first use."""
        self.counts: Tensor | None = None
        """``[rows, vocab]``: how often each token was generated (presence/frequency penalties)."""

    def reset(self, first: int, rows: Sequence[RowState]) -> None:
        """Start rows ``first, first + 1, ...`` afresh for new requests."""
        self.drawn[first : first + len(rows)] = 0
        if self.seen is not None:
            self._fill(first, rows)

    def move_rows(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """Copy the state of rows ``src`` into rows ``dst``."""
        if not dst:
            return
        dst_index, src_index = (torch.tensor(list(i), device=self.device) for i in (dst, src))
        for buffer in (self.drawn, self.seen, self.counts):
            if buffer is not None:
                buffer[dst_index] = buffer[src_index]

    def choose(self, logits: Tensor, first: int, rows: Sequence[RowState]) -> Choice:
        """Choose a token for rows ``first, first + 1, ...`` from their logits ``[len(rows), vocab]``."""
        logprobs = logits - logits.logsumexp(dim=-1, keepdim=True)
        constrained = self._constrain(logits, first, rows)
        tokens = constrained.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            index = torch.tensor(sampled, device=self.device)
            drawn = self.drawn[first : first + len(rows)][index]
            tokens[index] = self._sample(constrained[index], [rows[i] for i in sampled], drawn)
        return Choice(tokens, logprobs.gather(1, tokens[:, None]).squeeze(1), constrained)

    def record(self, first: int, tokens: Tensor) -> None:
        """Count the tokens chosen for rows ``first, first + 1, ...``."""
        span = slice(first, first + len(tokens))
        self.drawn[span] += 1
        if self.seen is not None:
            self.seen[span].scatter_(1, tokens[:, None], True)
            self.counts[span].scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))

    def _fill(self, first: int, rows: Sequence[RowState]) -> None:
        span = slice(first, first + len(rows))
        self.seen[span] = False
        self.counts[span] = 0
        for i, row in enumerate(rows, start=first):
            self.seen[i, torch.tensor(row.prompt + row.generated, dtype=torch.long, device=self.device)] = True
            if row.generated:
                generated = torch.tensor(row.generated, dtype=torch.long, device=self.device)
                self.counts[i].scatter_add_(0, generated, torch.ones_like(generated, dtype=self.counts.dtype))

    def _constrain(self, logits: Tensor, first: int, rows: Sequence[RowState]) -> Tensor:
        """Penalties (batched over rows), then the bans the host lists: bad words and the minimum length."""
        if any(row.penalised for row in rows):
            if self.seen is None:
                self.seen = torch.zeros(len(self.drawn), self.vocab_size, dtype=torch.bool, device=self.device)
                self.counts = torch.zeros(len(self.drawn), self.vocab_size, dtype=torch.int32, device=self.device)
                # Rows that came before used no penalty (this allocation would have happened for them): only these
                # rows need their history; later rows get theirs in reset().
                self._fill(first, rows)
            span = slice(first, first + len(rows))
            repetition, presence, frequency = self._column(
                rows, lambda r: (r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty))
            penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
            logits = torch.where(self.seen[span], penalised, logits)
            counts = self.counts[span].to(logits.dtype)
            logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
        bans = [(i, token) for i, row in enumerate(rows) for token in _banned(row) if token < self.vocab_size]
        if bans:
            if not any(row.penalised for row in rows):
                logits = logits.clone()
            index = torch.tensor(bans, device=self.device)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        return logits

    def _column(self, rows: Sequence[RowState], values) -> tuple[Tensor, ...]:
        table = torch.tensor([values(row) for row in rows], dtype=torch.float32, device=self.device)
        return tuple(table[:, j : j + 1] for j in range(table.shape[1]))

    def _sample(self, logits: Tensor, rows: Sequence[RowState], drawn: Tensor) -> Tensor:
        """Temperature, top-k and top-p filtering, then a Gumbel-max draw keyed on (seed, drawn, token)."""
        vocab = self.vocab_size
        top_ks = [min(row.params.top_k or vocab, vocab) for row in rows]
        top_ps = [row.top_p if row.top_p < 1.0 else 2.0 for row in rows]  # 2: keep every token, whatever rounding
        logits = logits / self._column(rows, lambda r: (r.params.temperature,))[0]
        largest_k = max((k for k in top_ks if k < vocab), default=None)
        if largest_k is not None:
            top_k = torch.tensor(top_ks, device=self.device)[:, None]
            kth = logits.topk(largest_k, dim=-1).values.gather(1, top_k.clamp(max=largest_k) - 1)
            logits = logits.masked_fill((logits < kth) & (top_k < vocab), float("-inf"))
        if any(p <= 1.0 for p in top_ps):
            top_p = torch.tensor(top_ps, device=self.device)[:, None]
            ordered = logits.sort(dim=-1, descending=True).values
            probs = ordered.softmax(dim=-1)
            # A token stays if the tokens ranked above it have not yet reached top_p (the top token always stays).
            kept = ((probs.cumsum(dim=-1) - probs) < top_p).sum(dim=-1, keepdim=True)
            logits = logits.masked_fill(logits < ordered.gather(1, kept - 1), float("-inf"))
        seeds = torch.tensor([row.seed for row in rows], dtype=torch.long, device=self.device)
        return (logits + gumbel_noise(seeds, drawn, logits.shape[-1])).argmax(dim=-1)


def _banned(row: RowState) -> list[int]:
    """Tokens ``row`` must not choose next: bad words whose prefix was just generated, ends before the minimum."""
    banned = []
    for words in row.bad_words:
        prefix = list(words[:-1])
        if not prefix or row.generated[-len(prefix):] == prefix:
            banned.append(words[-1])
    if len(row.generated) < row.params.min_new_tokens:
        banned.extend(row.end_ids)
    return banned


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant`` modulo 2**32 for uint32 values held in int64, without overflowing int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seeds: Tensor, drawn: Tensor, vocab_size: int) -> Tensor:
    """``[rows, vocab]`` standard Gumbel noise, a pure function of each row's seed and draw count and the token id."""
    key = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _mix32(drawn & _MASK32)))
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.long)
    bits = _mix32(key[:, None] ^ _mul32(tokens, 0x9E3779B9)[None, :])
    # 24 random bits make a uniform strictly inside (0, 1), exactly representable in float32.
    uniform = ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform))


@dataclass
class BeamChoice:
    """One step of beam search for one request: the beams to continue and the hypotheses that ended."""

    parents: list[int]
    """For each new beam, the index of the beam it extends."""
    tokens: list[int]
    scores: list[float]
    """Cumulative log probabilities of the new beams."""
    ended: list[tuple[int, int, float]]
    """``(parent beam, final token, cumulative log probability)`` of hypotheses that ended at this step."""


def beam_step(logprobs: Tensor, cumulative: list[float], end_ids: frozenset[int], width: int,
              diversity_rate: float = 0.0) -> BeamChoice:
    """Expand ``width`` beams by their best continuations; candidates ending in ``end_ids`` become hypotheses.

    ``logprobs`` is ``[beams, vocab]`` (already constrained). Each beam offers its best ``2 * width`` continuations,
    the k-th ranked ``k * diversity_rate`` lower; of the best ``2 * width`` candidates in that order, ending ones are
    set aside (only while they rank within the first ``width``), the rest fill the new beams. Scores are cumulative
    log probabilities (the diversity penalty only orders).
    """
    scores = logprobs + torch.tensor(cumulative, device=logprobs.device)[:, None]
    offered = scores.topk(min(2 * width, scores.shape[-1]), dim=-1)
    per_beam = offered.values.shape[-1]
    ranked = offered.values - diversity_rate * torch.arange(per_beam, device=scores.device)[None, :]
    best = ranked.reshape(-1).topk(min(2 * width, ranked.numel())).indices.tolist()
    values, tokens = offered.values.reshape(-1).tolist(), offered.indices.reshape(-1).tolist()
    choice = BeamChoice([], [], [], [])
    for rank, index in enumerate(best):
        score, token, parent = values[index], tokens[index], index // per_beam
        if score == float("-inf"):
            break
        if token in end_ids:
            if rank < width:
                choice.ended.append((parent, token, score))
            continue
        choice.parents.append(parent)
        choice.tokens.append(token)
        choice.scores.append(score)
        if len(choice.parents) == width:
            break
    return choice
