"""BERT: masked samples are well formed, and training gives the same losses under TP=2 and PP=2 as one process."""

import pytest
import torch

from launch import train_together
from lightning_megatron.data.datamodule import TokenWindows
from lightning_megatron.data import MaskedWindows


def test_masked_windows_mask_and_sentence_order():
    tokens = torch.arange(10_000).numpy() % 4000
    data = MaskedWindows(TokenWindows(tokens, 64), mask_token_id=4096, vocab_size=4096, seed=3, sentence_order=True)
    samples = [data[i] for i in range(len(data))]
    assert torch.equal(data[5]["tokens"], samples[5]["tokens"])  # deterministic per index
    chosen = torch.stack([s["loss_mask"] for s in samples]).bool()
    inputs = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    assert 0.12 < chosen.float().mean() < 0.18
    assert torch.equal(inputs[~chosen], labels[~chosen])
    assert 0.7 < (inputs[chosen] == 4096).float().mean() < 0.9
    order = torch.stack([s["sentence_order"] for s in samples])
    assert 0.3 < order.float().mean() < 0.7
    index = int(order.nonzero()[0])
    window = data.windows[index]["tokens"]
    swapped = samples[index]
    assert torch.equal(swapped["labels"], torch.cat([window[32:], window[:32]]))
    assert torch.equal(swapped["tokentype_ids"], (torch.arange(64) >= 32).long())


@pytest.mark.slow
def test_bert_trains_identically_under_tp2_and_pp2(tmp_path):
    args = ["--arch", "bert", "--steps", 4, "--layers", 2]
    reference = train_together(tmp_path, 1, {"ref": args})["ref"]["losses"]
    runs = train_together(tmp_path, 2, {"tp": ["--tp", 2, *args], "pp": ["--pp", 2, *args]})
    assert len(reference) == 4 and reference[-1] < reference[0]
    for name in ("tp", "pp"):
        assert runs[name]["losses"] == pytest.approx(reference, rel=1e-4), name
