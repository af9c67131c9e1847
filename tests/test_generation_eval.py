"""Evaluation: perplexity equals the model's own training loss; last-word accuracy counts greedy matches."""

import math

import pytest
import torch

from generation_helpers import cpu_process, ensure_parallel_state, tiny_gpt
from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import SamplingParams, generate
from lightning_megatron.generation.evaluate import last_word_accuracy, perplexity

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep."] * 3


@pytest.fixture(scope="module")
def models():
    with cpu_process():
        yield {arch: tiny_gpt(arch, seq_length=32) for arch in ("gpt2", "alibi")}, load_tokenizer(None)


@pytest.fixture
def setup(models):
    ensure_parallel_state()
    return models[0]["gpt2"], models[1]


@pytest.mark.parametrize("arch", ["gpt2", "alibi"])
def test_perplexity_is_the_exponential_of_the_models_loss(models, arch):
    """The inference forward (generation's runner and cached attention) against the training forward."""
    ensure_parallel_state()
    model, tokenizer = models[0][arch], models[1]
    result = perplexity(model, tokenizer, TEXTS, batch_size=2)
    stream = [t for text in TEXTS for t in (*tokenizer.encode(text), tokenizer.eod)]
    losses = []
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 32):
            window = torch.tensor(stream[start : start + 33])[None]
            tokens, labels = window[:, :-1], window[:, 1:]
            positions = torch.arange(tokens.shape[1])[None]
            losses.append(model.chunks[0](tokens, positions, None, labels=labels).reshape(-1))
    expected = torch.cat(losses).double().mean().item()
    assert result["tokens"] == len(stream) - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_last_word_accuracy_counts_greedy_matches(setup):
    ensure_parallel_state()
    model, tokenizer = setup
    contexts = ["In the beginning God", "And the earth was", "Blessed are the"]
    examples = []
    for context in contexts:
        # Make the model's own greedy continuation the target word, so the right answer is known.
        out = generate(model, context, SamplingParams(max_new_tokens=6, ignore_eos=True), tokenizer=tokenizer)[0]
        word = out.text.split()[0] if out.text.split() else ""
        if word and (context + out.text).startswith(context + " " + word):
            examples.append(f"{context} {word}")
    assert examples, "the tiny model produced no whole first word to test with"
    good = last_word_accuracy(model, tokenizer, examples, batch_size=2)
    bad = last_word_accuracy(model, tokenizer, [e.rpartition(" ")[0] + " zzqx" for e in examples])
    assert good["accuracy"] == 1.0 and good["examples"] == len(examples)
    assert bad["accuracy"] == 0.0
