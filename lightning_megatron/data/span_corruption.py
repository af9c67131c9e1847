"""T5 span-corruption samples from a text corpus: sentinel-masked encoder input, spans as decoder targets."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_megatron.data.datamodule import TextDataModule, TokenWindows, WindowSamples


class SpanCorruption(WindowSamples):
    """T5 span corruption over token windows: ~15% of tokens in spans of mean length 3 become sentinels in the
    encoder input; the decoder predicts ``sentinel_0 span_0 sentinel_1 span_1 ...`` (deterministic per index)."""

    def __init__(self, windows: TokenWindows, first_sentinel: int, decoder_seq_length: int, seed: int) -> None:
        super().__init__(windows, seed)
        self.first_sentinel = first_sentinel
        self.decoder_seq_length = decoder_seq_length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, generator = self.window(index)
        seq = tokens.shape[0]
        starts = (torch.rand(seq, generator=generator) < 0.05).nonzero().flatten().tolist()
        enc, target, position, sentinel = [], [], 0, self.first_sentinel
        for start in starts:
            if start < position or len(target) + 4 > self.decoder_seq_length:
                continue
            end = min(seq, start + 3)
            enc += tokens[position:start].tolist() + [sentinel]
            target += [sentinel] + tokens[start:end].tolist()
            position, sentinel = end, sentinel + 1
        enc += tokens[position:].tolist()
        target.append(sentinel)
        enc_tokens = torch.zeros(seq, dtype=torch.int64)
        enc_tokens[: len(enc)] = torch.tensor(enc)
        enc_mask = torch.zeros(seq, dtype=torch.int64)
        enc_mask[: len(enc)] = 1
        labels = torch.zeros(self.decoder_seq_length, dtype=torch.int64)
        labels[: len(target)] = torch.tensor(target)
        loss_mask = torch.zeros(self.decoder_seq_length)
        loss_mask[: len(target)] = 1.0
        dec_tokens = torch.cat([torch.zeros(1, dtype=torch.int64), labels[:-1]])
        return {"enc_tokens": enc_tokens, "enc_mask": enc_mask, "dec_tokens": dec_tokens, "labels": labels,
                "loss_mask": loss_mask}


class SpanCorruptionDataModule(TextDataModule):
    """Span-corruption batches over a text corpus (the bundled KJV by default) for :class:`~lightning_megatron.models.t5.T5`.

    Sentinels are ids from the tokenizer's vocabulary size upwards (at most ``decoder_seq_length // 4 + 1``), so
    give the model that many extra vocabulary entries; the decoder starts from id 0.
    """

    def __init__(self, *, decoder_seq_length: int = 64, **kwargs: Any) -> None:
        """``kwargs`` are :class:`~lightning_megatron.data.TextDataModule`'s (corpus, tokenizer, batch sizes, ...)."""
        super().__init__(**kwargs)
        self.decoder_seq_length = decoder_seq_length

    def wrap(self, dataset: Dataset) -> SpanCorruption:
        """Corrupt spans of every token window of a split."""
        return SpanCorruption(dataset, self.tokenizer.vocab_size, self.decoder_seq_length, self.seed)
