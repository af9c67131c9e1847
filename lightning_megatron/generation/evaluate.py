"""``lightning-megatron evaluate``: perplexity on a text file and last-word accuracy on LAMBADA-format jsonl.

    lightning-megatron evaluate --ckpt last.ckpt --text held_out.txt --lambada lambada_test.jsonl

Both score text the way lm-evaluation-harness does, through the same scoring code as the server and the harness
adapter (:mod:`lightning_megatron.generation.scoring`), so the numbers agree with ``lm-eval`` run on the same texts.
Perplexity is ``exp`` of the mean next-token loss over the documents, each scored on its own (its first token
conditioned on the tokenizer's BOS, else end-of-document) in windows of the model's sequence length
(lm-eval's ``loglikelihood_rolling``). LAMBADA-format lines are ``{"text": "..."}``; an example counts as correct
when every token of its last word is the model's most likely next token (lm-eval's ``acc`` on ``lambada``), and
the perplexity of the last words is reported too.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Sequence

from lightning_megatron.data.corpus import read_texts
from lightning_megatron.errors import UserError
from lightning_megatron.generation import build_engine
from lightning_megatron.generation.scoring import (
    continuation_loglikelihoods,
    prefix_token,
    rolling_loglikelihoods,
)
from lightning_megatron.generation.session import add_model_arguments, check_layout, run_inference


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8) -> dict[str, float]:
    """``{"perplexity", "loss", "tokens", "loglikelihood"}`` of ``texts`` (every rank of the replica calls it
    together); ``loglikelihood`` is the summed log probability of all their tokens."""
    documents = [ids for ids in tokenizer.encode_batch(list(texts)) if ids]
    tokens = sum(len(ids) for ids in documents)
    if not tokens:
        raise UserError("the text holds no tokens; nothing to score")
    engine = build_engine(model, tokenizer, max_batch_size=batch_size)
    total = sum(rolling_loglikelihoods(engine, documents, prefix_token(tokenizer)))
    return {"perplexity": math.exp(-total / tokens), "loss": -total / tokens, "tokens": tokens,
            "loglikelihood": total}


def split_last_word(text: str) -> tuple[str, str]:
    """``(context, " " + last word)`` of a LAMBADA example."""
    context, _, word = text.strip().rpartition(" ")
    if not context:
        raise UserError(f"a LAMBADA example needs a context and a last word: {text[:80]!r}")
    return context, " " + word


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-evaluation-harness splits them: the whole text is encoded and the
    context's tokens cut off its front, so that tokens merging across the boundary belong to the continuation."""
    whole = tokenizer.encode(context + continuation)
    split = len(tokenizer.encode(context))
    return whole[:split], whole[split:]


def last_word_accuracy(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8) -> dict[str, float]:
    """``{"accuracy", "correct", "examples", "perplexity"}``: greedy prediction of each text's last word."""
    pairs = [encode_pair(tokenizer, *split_last_word(text)) for text in texts]
    engine = build_engine(model, tokenizer, max_batch_size=batch_size)
    scores = continuation_loglikelihoods(engine, pairs)
    correct = sum(greedy for _, greedy in scores)
    return {"accuracy": correct / len(scores), "correct": correct, "examples": len(scores),
            "perplexity": math.exp(-sum(ll for ll, _ in scores) / len(scores))}


def main(argv: Sequence[str]) -> int:
    """Entry point of ``lightning-megatron evaluate``; prints the metrics as JSON."""
    parser = argparse.ArgumentParser(prog="lightning-megatron evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--text", help="text file for perplexity (.txt: one document per line, or .jsonl)")
    parser.add_argument("--json-key", default="text", help="the text field of .jsonl files")
    parser.add_argument("--lambada", help="LAMBADA-format jsonl for last-word accuracy")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    args = parser.parse_args(list(argv))
    check_layout(parser, args)
    if not args.text and not args.lambada:
        parser.error("give --text and/or --lambada")
    texts = list(read_texts(args.text, args.json_key)) if args.text else []
    lambada = list(read_texts(args.lambada, "text")) if args.lambada else []

    def evaluate(model: Any, tokenizer: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if texts:
            results["text"] = perplexity(model, tokenizer, texts, args.batch_size)
        if lambada:
            results["lambada"] = last_word_accuracy(model, tokenizer, lambada, args.batch_size)
        return results

    results = run_inference(args, evaluate)
    if results is not None:
        print(json.dumps(results, indent=2))
        if args.output:
            with open(args.output, "w") as handle:
                json.dump(results, handle)
    return 0
