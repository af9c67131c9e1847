"""Masked-LM samples for BERT from a text corpus: masked token windows with an optional sentence-order task."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_megatron.data.datamodule import TextDataModule, TokenWindows, WindowSamples


class MaskedWindows(WindowSamples):
    """BERT samples from token windows: 15% of positions masked (80% mask token, 10% random, 10% kept),
    deterministically per sample index, and with ``sentence_order`` the two halves swapped half of the time."""

    def __init__(self, windows: TokenWindows, mask_token_id: int, vocab_size: int, seed: int,
                 sentence_order: bool) -> None:
        super().__init__(windows, seed)
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.sentence_order = sentence_order

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, generator = self.window(index)
        seq = tokens.shape[0]
        half = seq // 2
        swapped = bool(self.sentence_order and torch.rand((), generator=generator) < 0.5)
        if swapped:
            tokens = torch.cat([tokens[half:], tokens[:half]])
        tokentype_ids = torch.zeros(seq, dtype=torch.int64)
        tokentype_ids[seq - half if swapped else half :] = 1
        chosen = torch.rand(seq, generator=generator) < 0.15
        roll = torch.rand(seq, generator=generator)
        inputs = tokens.clone()
        inputs[chosen & (roll < 0.8)] = self.mask_token_id
        randomised = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[randomised] = torch.randint(0, self.vocab_size, (int(randomised.sum()),), generator=generator)
        sample = {"tokens": inputs, "labels": tokens, "loss_mask": chosen.float(),
                  "padding_mask": torch.ones(seq, dtype=torch.int64), "tokentype_ids": tokentype_ids}
        if self.sentence_order:
            sample["sentence_order"] = torch.tensor(int(swapped))
        return sample


class MaskedLMDataModule(TextDataModule):
    """Masked-LM batches over a text corpus (the bundled KJV by default) for :class:`~lightning_megatron.models.bert.Bert`.

    The corpus is tokenised and windowed like :class:`~lightning_megatron.data.TextDataModule`; the mask token is
    ``mask_token_id`` (default: one past the tokenizer's vocabulary, so give the model ``vocab_size + 1``).
    """

    def __init__(self, *, mask_token_id: int | None = None, sentence_order: bool = False, **kwargs: Any) -> None:
        """``kwargs`` are :class:`~lightning_megatron.data.TextDataModule`'s (corpus, tokenizer, batch sizes, ...)."""
        super().__init__(**kwargs)
        self.mask_token_id = mask_token_id
        self.sentence_order = sentence_order

    def wrap(self, dataset: Dataset) -> MaskedWindows:
        """Mask every token window of a split."""
        vocab = self.tokenizer.vocab_size
        mask_id = vocab if self.mask_token_id is None else self.mask_token_id
        return MaskedWindows(dataset, mask_id, vocab, self.seed, self.sentence_order)
