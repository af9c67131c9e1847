"""Evaluation: perplexity is the model's log-likelihood in lm-eval's rolling windows; last-word accuracy counts greedy
matches."""

import math

import pytest
import torch

from generation_helpers import cpu_process, ensure_parallel_state, tiny_gpt
from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import SamplingParams, generate
from lightning_megatron.generation.evaluate import last_word_accuracy, perplexity
from lightning_megatron.generation.scoring import rolling_windows

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep."] * 3


@pytest.fixture(scope="module")
def setup():
    with cpu_process():
        yield tiny_gpt("gpt2", seq_length=32), load_tokenizer(None)


def test_perplexity_is_the_models_loglikelihood_in_lm_eval_rolling_windows(setup):
    """Each document scored on its own after end-of-document, in lm-evaluation-harness's rolling windows, with the
    log probabilities of a direct forward pass."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ensure_parallel_state()
    model, tokenizer = setup
    texts = TEXTS + [" ".join(TEXTS)]  # the last one spans several windows of 32 tokens
    result = perplexity(model, tokenizer, texts, batch_size=2)
    documents = tokenizer.encode_batch(texts)
    total = 0.0
    model.chunks[0].eval()
    with torch.no_grad():
        for document in documents:
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    document, tokenizer.eod, max_seq_len=31, context_len=1)):
                window = torch.tensor(context + predicted)[None]
                logits = model.chunks[0](window[:, :-1], torch.arange(window.shape[1] - 1)[None], None)
                logprobs = logits[0, :, :4096].float().log_softmax(-1)
                targets = window[0, 1:]
                total += logprobs.gather(1, targets[:, None])[-len(predicted):].sum().item()
    tokens = sum(len(d) for d in documents)
    assert len(documents[-1]) > 64
    assert result["tokens"] == tokens
    assert result["loglikelihood"] == pytest.approx(total, abs=1e-3)
    assert result["loss"] == pytest.approx(-total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-5)


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for size in (1, 5, 31, 32, 62, 63, 100):
        tokens = list(range(100, 100 + size))
        expected = [(c + p, len(p)) for c, p in map(make_disjoint_window, get_rolling_token_windows(
            tokens, 7, max_seq_len=31, context_len=1))]
        assert rolling_windows(tokens, 7, 32) == expected


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
