"""Datamodules that feed the megatron strategy: global-batch sampling by data-parallel rank.

:class:`MegatronDataModule` owns ``global_batch_size`` and ``micro_batch_size``: the strategy reads them (and
checks they divide the layout), and each data-parallel rank's loader yields ``global_batch_size / DP`` samples per
step. Subclasses provide ``train_dataset``/``val_dataset``/``test_dataset`` of GPT samples (see
:class:`TokenWindows`). :class:`TextDataModule` tokenises a text corpus (the bundled one by default).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_megatron.atomic import atomic_write
from lightning_megatron.data.corpus import BUNDLED_CORPUS, read_texts
from lightning_megatron.data.sampler import GlobalBatchLoader, GlobalBatchSampler, GlobalBatchSizes
from lightning_megatron.data.tokenizer import LazyTokenizer, cache_dir
from lightning_megatron.errors import UserError
from lightning_megatron.preflight import check_batch_sizes


class TokenWindows(Dataset):
    """Consecutive windows of ``seq_length + 1`` tokens of one token stream, as GPT training samples."""

    def __init__(self, tokens: np.ndarray, seq_length: int) -> None:
        self.tokens = tokens
        self.seq_length = seq_length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_length
        window = torch.from_numpy(self.tokens[start : start + self.seq_length + 1].astype(np.int64))
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


class WindowSamples(Dataset):
    """Base of datasets that make another kind of sample out of each token window, the same one for an index on
    every run and every layout."""

    def __init__(self, windows: TokenWindows, seed: int) -> None:
        self.windows = windows
        self.seed = seed

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Generator]:
        """The tokens of window ``index`` and a generator seeded by (seed, index) for the random choices."""
        return self.windows[index]["tokens"], torch.Generator().manual_seed(self.seed * 1_000_003 + index)


class MegatronDataModule(pl.LightningDataModule):
    """Base datamodule: builds loaders whose batches are this data-parallel rank's share of each global batch."""

    shuffle_train = True  # subclasses whose datasets are already shuffled (megatron-core's) turn this off

    def __init__(self, global_batch_size: int = 16, micro_batch_size: int = 4, seed: int = 1234, num_workers: int = 0,
                 rampup_batch_size: list[int] | None = None) -> None:
        super().__init__()
        check_batch_sizes(global_batch_size, micro_batch_size)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.batch_sizes = GlobalBatchSizes(global_batch_size, rampup_batch_size)
        """The global batch size at each point of training (ramp-up included); the strategy validates every one."""
        self.seed = seed
        self.num_workers = num_workers
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _data_parallel(self) -> tuple[int, int]:
        kwargs = self.trainer.strategy.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 0, 1
        return kwargs["rank"], kwargs["num_replicas"]

    def _consumed_samples(self) -> int:
        return self.batch_sizes.consumed_after(self.trainer.global_step) if self.trainer is not None else 0

    def data_description(self) -> str:
        """Names the data in error messages (its files, its split)."""
        return type(self).__name__

    def wrap(self, dataset: Dataset) -> Dataset:
        """Adapt a split to the model's batch contract (identity here; BERT and T5 datamodules mask it)."""
        return dataset

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None or len(dataset) == 0:
            raise UserError(f"the {split} split of {self.data_description()} is empty; add data or change the split")
        if len(dataset) < self.global_batch_size:
            raise UserError(
                f"the {split} split of {self.data_description()} holds {len(dataset)} samples, fewer than one global "
                f"batch of {self.global_batch_size}; add data, change the split or use a smaller global_batch_size"
            )
        rank, size = self._data_parallel()
        sampler = GlobalBatchSampler(
            len(dataset),
            self.batch_sizes if train else self.global_batch_size,
            dp_rank=rank,
            dp_size=size,
            shuffle=train and self.shuffle_train,
            seed=self.seed,
            consumed_samples=self._consumed_samples if train else (lambda: 0),
        )
        return GlobalBatchLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", train=False)


class TextDataModule(MegatronDataModule, LazyTokenizer):
    """GPT samples from a text corpus (``.jsonl``, ``.jsonl.gz`` or ``.txt``; the bundled KJV corpus by default).

    Documents are tokenised (cached on disk), joined with the end-of-document token, and cut into windows of
    ``seq_length + 1`` tokens; the last ``val_fraction`` of the documents is held out for validation and testing.
    """

    def __init__(self, path: str | None = None, tokenizer: str | None = None, json_key: str = "text",
                 seq_length: int = 128, val_fraction: float = 0.05, **kwargs: Any) -> None:
        """``kwargs`` are :class:`MegatronDataModule`'s (batch sizes, seed, workers, ramp-up)."""
        super().__init__(**kwargs)
        self.path = Path(path) if path else BUNDLED_CORPUS
        self.tokenizer_spec = tokenizer
        self.json_key = json_key
        self.seq_length = seq_length
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.val_fraction = val_fraction

    def data_description(self) -> str:
        return f"{self.path} (val_fraction={self.val_fraction})"

    def prepare_data(self) -> None:
        self._encoded()

    def setup(self, stage: str) -> None:
        train, held_out = self._encoded()
        self.train_dataset = self.wrap(TokenWindows(train, self.seq_length))
        self.val_dataset = self.test_dataset = self.wrap(TokenWindows(held_out, self.seq_length))

    def _encoded(self) -> tuple[np.ndarray, np.ndarray]:
        """(train tokens, held-out tokens), tokenised once per corpus and tokenizer and cached as ``.npz``."""
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file {self.path} does not exist; pass data.path=<your .jsonl or .txt>")
        key = hashlib.sha256(
            f"{self.path.resolve()}:{self.path.stat().st_size}:{self.path.stat().st_mtime_ns}:{self.json_key}:"
            f"{self.val_fraction}:{self.tokenizer.unique_identifiers['sha256']}".encode()
        ).hexdigest()[:16]
        cache = cache_dir() / f"tokens-{key}.npz"
        if cache.is_file():
            with np.load(cache) as saved:
                return saved["train"], saved["held_out"]
        documents = list(read_texts(self.path, self.json_key))
        if len(documents) < 2:
            raise UserError(f"{self.path} holds {len(documents)} document(s); need at least 2 to hold one out")
        split = max(1, int(len(documents) * (1.0 - self.val_fraction)))
        encoded = self.tokenizer.encode_batch(documents)
        eod = self.tokenizer.eod
        streams = [np.fromiter((t for doc in part for t in (*doc, eod)), dtype=np.int32)
                   for part in (encoded[:split], encoded[split:])]
        with atomic_write(cache) as tmp:
            np.savez(tmp, train=streams[0], held_out=streams[1])
        return streams[0], streams[1]
