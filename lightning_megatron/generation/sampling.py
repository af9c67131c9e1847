"""Turning next-token logits into tokens: penalties and constraints, then greedy, temperature, top-k, top-p choice.

Every function works on a batch of rows whose requests may each use other settings (:class:`RowState` per row).
Random draws use each request's own generator, so a seeded request samples the same tokens whatever else shares
its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_megatron.generation.params import SamplingParams


@dataclass
class RowState:
    """What choosing the next token of one sequence needs to know about it."""

    params: SamplingParams
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    end_ids: frozenset[int] = frozenset()
    """Tokens that end the sequence (end-of-document unless ignored, stop token ids)."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    generator: torch.Generator | None = None
    top_p: float = 1.0
    """The current nucleus, which decays as tokens are generated."""
    logprobs: list[float] = field(default_factory=list)
    """The model's log probability of each generated token."""

    def fork(self) -> "RowState":
        """A copy that shares the generator (a beam taking over another's history)."""
        return RowState(self.params, self.prompt, list(self.generated), self.end_ids, self.bad_words,
                        self.generator, self.top_p, list(self.logprobs))

    def advance(self, token: int, logprob: float) -> None:
        """Record a generated token (and its log probability); update the decaying nucleus."""
        self.generated.append(token)
        self.logprobs.append(logprob)
        p = self.params
        if token in p.top_p_reset_ids:
            self.top_p = p.top_p
        elif p.top_p_decay < 1.0:
            self.top_p = max(self.top_p * p.top_p_decay, p.top_p_min)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request: seeded when asked, otherwise from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def constrain(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Apply penalties, bad words and the minimum length to ``logits`` ``[rows, vocab]`` (a new tensor)."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt) | set(row.generated)), dtype=torch.long, device=logits.device)
            seen = seen[seen < vocab]
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.generated:
            counts = torch.bincount(torch.tensor(row.generated, device=logits.device), minlength=vocab)[:vocab]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        for words in row.bad_words:
            prefix = list(words[:-1])
            if not prefix or row.generated[-len(prefix):] == prefix:
                if words[-1] < vocab:
                    logits[i, words[-1]] = float("-inf")
        if len(row.generated) < p.min_new_tokens:
            for token in row.end_ids:
                if token < vocab:
                    logits[i, token] = float("-inf")
    return logits


def choose(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Pick one token per row from constrained ``logits``: argmax for greedy rows, else a seeded draw."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not sampled:
        return tokens
    index = torch.tensor(sampled, device=logits.device)
    subset = logits[index]
    temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
    subset = subset / temperature[:, None]
    ordered, order = subset.sort(dim=-1, descending=True)
    rank = torch.arange(subset.shape[-1], device=logits.device)[None, :]
    top_k = torch.tensor([rows[i].params.top_k or subset.shape[-1] for i in sampled], device=logits.device)
    drop = rank >= top_k[:, None]
    top_p = torch.tensor([rows[i].top_p for i in sampled], device=logits.device)
    probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # A token stays if the tokens ranked above it have not yet reached top_p (so the top token always stays).
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    for j, i in enumerate(sampled):
        pick = torch.multinomial(probs[j], 1, generator=rows[i].generator)
        tokens[i] = order[j, pick[0]]
    return tokens


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


def beam_step(logprobs: torch.Tensor, cumulative: list[float], end_ids: frozenset[int], width: int) -> BeamChoice:
    """Expand ``width`` beams by their best continuations; candidates ending in ``end_ids`` become hypotheses.

    ``logprobs`` is ``[beams, vocab]`` (already constrained). Of the best ``2 * width`` candidates in score order,
    ending ones are set aside (only while they rank within the first ``width``), the rest fill the new beams.
    """
    scores = logprobs + torch.tensor(cumulative, device=logprobs.device)[:, None]
    flat = scores.reshape(-1)
    best = flat.topk(min(2 * width, flat.numel()))
    vocab = logprobs.shape[-1]
    choice = BeamChoice([], [], [], [])
    for rank, (score, index) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
        if score == float("-inf"):
            break
        parent, token = divmod(index, vocab)
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
