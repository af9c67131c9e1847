"""Log probabilities of given text under the model: the one scoring path behind the server's ``echo``/``logprobs``,
the lm-evaluation-harness adapter and ``lightning-megatron evaluate``.

The engine scores prompt tokens in its prefill with :func:`prefill_scores`; :func:`score_prompts` runs score-only
requests (``max_new_tokens=0``) through an engine, and :func:`continuation_loglikelihoods` and
:func:`rolling_loglikelihoods` build lm-evaluation-harness's two kinds of log-likelihood request on it, so every tool
reports the same numbers for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from lightning_megatron.generation.params import SamplingParams

if TYPE_CHECKING:
    from lightning_megatron.generation.engine import Engine
    from lightning_megatron.generation.requests import Request


@dataclass
class TokenScores:
    """The model's log probability of each of a sequence's tokens, and the most likely tokens at each position."""

    logprobs: list[float]
    top: list[dict[int, float]]
    """Per position, the requested number of most likely tokens (id -> log probability), most likely first."""


def top_alternatives(logprobs: torch.Tensor, n: int) -> list[dict[int, float]]:
    """The ``n`` most likely tokens (id -> log probability) of each row of ``logprobs`` ``[rows, vocab]``."""
    if n <= 0:
        return [{} for _ in range(logprobs.shape[0])]
    values, indices = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)
    return [dict(zip(ids, values)) for ids, values in zip(indices.tolist(), values.tolist())]


def score_tokens(logits: torch.Tensor, targets: Sequence[int], top_n: int = 0) -> TokenScores:
    """Log probability of ``targets[i]`` under ``logits[i]`` (``[positions, vocab]``, each the position before its
    target), with the ``top_n`` most likely tokens at each position."""
    logprobs = logits.float().log_softmax(dim=-1)
    index = torch.tensor(list(targets), dtype=torch.long, device=logits.device)[:, None]
    return TokenScores(logprobs.gather(1, index).squeeze(1).tolist(), top_alternatives(logprobs, top_n))


def prefill_scores(requests: Sequence["Request"], logits: torch.Tensor, first: int, clock: int
                   ) -> dict[int, TokenScores]:
    """On the source rank, after a prefill of ``requests`` (``logits``: their rows at cache positions ``[first,
    clock)``): the scores of the prompts of the requests that asked for them, by request id."""
    scores, row = {}, 0
    for request in requests:
        if request.params.prompt_logprobs is not None:
            positions = logits[row, request.start - first : clock - first - 1]
            scores[request.id] = score_tokens(positions, request.prompt[1:], request.params.prompt_logprobs)
        row += request.width
    return scores


def score_prompts(engine: "Engine", prompts: Sequence[Sequence[int]], scored: Sequence[int]
                  ) -> list[tuple[float, bool]]:
    """For each prompt, the summed log probability of its last ``scored`` tokens and whether every one of them is the
    model's most likely next token; every rank of the model replica calls it together.

    A prompt may hold up to the model's sequence length; prompts run longest first, so batches pad little.
    """
    if len(prompts) != len(scored):
        raise ValueError(f"got {len(scored)} counts of scored tokens for {len(prompts)} prompts")
    for prompt, count in zip(prompts, scored):
        if not 0 < count < len(prompt):
            raise ValueError(f"cannot score the last {count} of {len(prompt)} tokens: the first token of a prompt has "
                             f"no log probability")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs = engine.generate([prompts[i] for i in order], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    results: list[Any] = [None] * len(prompts)
    for i, output in zip(order, outputs):
        logprobs = output.prompt_logprobs[-scored[i]:]
        top = output.prompt_top_logprobs[-scored[i]:]
        # Greedy as lm-evaluation-harness judges it from an OpenAI response: each token is as likely as the top one.
        results[i] = (float(sum(logprobs)), all(lp >= max(best.values()) for lp, best in zip(logprobs, top)))
    return results


def continuation_loglikelihoods(engine: "Engine", pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                                ) -> list[tuple[float, bool]]:
    """lm-evaluation-harness's ``loglikelihood``: ``(log P(continuation | context), continuation is greedy)`` for
    each ``(context tokens, continuation tokens)``; contexts are cut on the left to fit the sequence length."""
    length = engine.max_sequence_length
    for _, continuation in pairs:
        if not 0 < len(continuation) < length:
            raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored by a model that reads "
                             f"{length}; it needs 1 to {length - 1} tokens")
    prompts = [(list(context) + list(continuation))[-length:] for context, continuation in pairs]
    return score_prompts(engine, prompts, [len(continuation) for _, continuation in pairs])


def rolling_windows(tokens: Sequence[int], prefix: int, length: int) -> list[tuple[list[int], int]]:
    """``(prompt, scored)`` windows that predict every token of ``tokens`` once, each prompt at most ``length``
    tokens, the first conditioned on ``prefix`` alone: lm-evaluation-harness's rolling windows (context length 1,
    made disjoint) for ``length - 1`` predictions per window."""
    if length < 2:
        raise ValueError("rolling windows need a length of at least 2 (one token of context, one to predict)")
    per_window = length - 1
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(per_window, len(tokens))
    windows = [([prefix] + tokens[:first], first)]
    predicted = first
    while predicted < len(tokens):
        count = min(per_window, len(tokens) - predicted)
        end = predicted + count
        windows.append((tokens[end - per_window - 1 : end], count))
        predicted = end
    return windows


def rolling_loglikelihoods(engine: "Engine", documents: Sequence[Sequence[int]], prefix: int) -> list[float]:
    """lm-evaluation-harness's ``loglikelihood_rolling``: the log probability of each whole document (its first token
    conditioned on ``prefix``), scored in windows of the model's sequence length."""
    windows = [rolling_windows(document, prefix, engine.max_sequence_length) for document in documents]
    flat = [window for document in windows for window in document]
    scores = iter(score_prompts(engine, [prompt for prompt, _ in flat], [count for _, count in flat]))
    return [float(sum(next(scores)[0] for _ in document)) for document in windows]


def prefix_token(tokenizer: Any) -> int:
    """The token a document's first token is conditioned on: the tokenizer's BOS if it has one, else end-of-document
    (what lm-evaluation-harness's models use)."""
    bos = getattr(tokenizer, "bos", None)
    return bos if bos is not None else tokenizer.eod
