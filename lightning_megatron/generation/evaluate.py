"""``lightning-megatron evaluate``: perplexity on a text file and last-word accuracy on LAMBADA-format jsonl.

    lightning-megatron evaluate --ckpt last.ckpt --text held_out.txt --lambada lambada_test.jsonl

Perplexity is ``exp`` of the mean next-token loss over the file's documents (each followed by the end-of-document
token) cut into windows of the model's sequence length. LAMBADA-format lines are ``{"text": "..."}``; an example
counts as correct when greedy decoding reproduces every token of its last word from the rest of the text.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Sequence

import torch

from lightning_megatron.data.corpus import read_texts
from lightning_megatron.errors import UserError
from lightning_megatron.generation.runner import ModelRunner
from lightning_megatron.generation.session import add_model_arguments, run_inference


def _runner(model: Any) -> ModelRunner:
    return ModelRunner(model.chunks, model.config.vocab_size)


def _causal(batch: int, length: int) -> tuple[torch.Tensor, None]:
    """Positions of right-padded rows, and no mask: plain causal attention (padding only follows real tokens)."""
    return torch.arange(length).expand(batch, length), None


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8) -> dict[str, float]:
    """``{"perplexity", "loss", "tokens"}`` of ``texts`` (every rank of the replica calls it together)."""
    length = model.config.seq_length
    stream = [t for ids in tokenizer.encode_batch(list(texts)) for t in (*ids, tokenizer.eod)]
    windows = [stream[i : i + length + 1] for i in range(0, max(len(stream) - 1, 1), length)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise UserError("the text holds fewer than 2 tokens; nothing to score")
    runner = _runner(model)
    total = torch.zeros(2, dtype=torch.float64)
    with runner.inference_mode():
        for start in range(0, len(windows), batch_size):
            group = windows[start : start + batch_size]
            width = max(len(w) for w in group) - 1
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            labels = torch.zeros(len(group), width, dtype=torch.long)
            valid = torch.zeros(len(group), width, dtype=torch.bool)
            for row, window in enumerate(group):
                tokens[row, : len(window) - 1] = torch.tensor(window[:-1])
                labels[row, : len(window) - 1] = torch.tensor(window[1:])
                valid[row, : len(window) - 1] = True
            logits = runner.forward(tokens, *_causal(len(group), width))
            if logits is not None:
                losses = -logits.log_softmax(-1).gather(-1, labels.to(logits.device)[..., None]).squeeze(-1)
                valid = valid.to(logits.device)
                total += torch.stack([losses[valid].double().sum(), valid.sum().double()]).cpu()
    loss, count = runner.broadcast(total.tolist() if runner.is_source else None)
    return {"perplexity": math.exp(loss / count), "loss": loss / count, "tokens": int(count)}


def last_word_accuracy(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8) -> dict[str, float]:
    """``{"accuracy", "correct", "examples"}``: greedy prediction of each text's last word from the rest."""
    length = model.config.seq_length
    examples = []
    for text in texts:
        context, _, word = text.strip().rpartition(" ")
        if not context:
            raise UserError(f"a LAMBADA example needs a context and a last word: {text[:80]!r}")
        target = tokenizer.encode(" " + word)
        ids = (tokenizer.encode(context) + target)[-(length + 1):]
        examples.append((ids, len(target)))
    runner = _runner(model)
    correct = 0
    with runner.inference_mode():
        for start in range(0, len(examples), batch_size):
            group = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in group) - 1
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            for row, (ids, _) in enumerate(group):
                tokens[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            logits = runner.forward(tokens, *_causal(len(group), width))
            if logits is None:
                continue
            predicted = logits.argmax(-1).cpu()
            for row, (ids, target) in enumerate(group):
                end = len(ids) - 1
                correct += int(predicted[row, end - target : end].tolist() == ids[-target:])
    correct = runner.broadcast(correct if runner.is_source else None)
    return {"accuracy": correct / len(examples), "correct": correct, "examples": len(examples)}


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
