"""Your own data: any map-style dataset of token ids becomes GPT samples the megatron strategy can train on.

The GPT batch contract (what :class:`~lightning_megatron.models.gpt.GPT` reads): a dict of ``[B, S]`` tensors
``tokens`` (int64 input ids), ``labels`` (int64 next-token targets), ``loss_mask`` (float32, 1 where the label
counts), ``position_ids`` (int64). :class:`GPTSamples` produces it from sequences of ``seq_length + 1`` ids or
fewer; :class:`DatasetDataModule` serves any datasets in that form with global-batch sampling.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_megatron.data.datamodule import MegatronDataModule
from lightning_megatron.errors import UserError


def _as_ids(value: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value), dtype=torch.int64).reshape(-1)


class GPTSamples(Dataset):
    """GPT samples of ``seq_length`` tokens from a dataset whose items are token-id sequences or dicts.

    An item is a sequence of ids (list, array, tensor) or a dict with ``input_ids`` and optionally ``loss_mask``
    (per id, 1 = this id is a target to learn) and ``position_ids`` (per id). Items longer than
    ``seq_length + 1`` ids are truncated; shorter ones are padded with ``pad_id`` and their padding is masked out.
    """

    def __init__(self, dataset: Sequence[Any] | Dataset, seq_length: int, pad_id: int = 0) -> None:
        self.dataset = dataset
        self.seq_length = seq_length
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise KeyError(f"item {index} is a dict without 'input_ids' (keys: {sorted(item)})")
            ids = _as_ids(item["input_ids"])
            mask = torch.as_tensor(np.asarray(item.get("loss_mask", np.ones(len(ids)))), dtype=torch.float32)
            positions = _as_ids(item["position_ids"]) if "position_ids" in item else torch.arange(len(ids))
        else:
            ids = _as_ids(item)
            mask, positions = torch.ones(len(ids)), torch.arange(len(ids))
        if len(ids) < 2:
            raise UserError(f"item {index} has {len(ids)} token(s); a GPT sample needs at least 2")
        if not len(mask) == len(positions) == len(ids):
            raise UserError(f"item {index}: input_ids, loss_mask and position_ids differ in length")
        length = min(len(ids), self.seq_length + 1)
        pad = self.seq_length + 1 - length
        ids = torch.nn.functional.pad(ids[:length], (0, pad), value=self.pad_id)
        mask = torch.nn.functional.pad(mask[:length], (0, pad))
        positions = torch.nn.functional.pad(positions[:length], (0, pad))
        return {
            "tokens": ids[:-1],
            "labels": ids[1:],
            "loss_mask": mask[1:],
            "position_ids": positions[:-1],
        }


class DatasetDataModule(MegatronDataModule):
    """Serves given map-style datasets (GPT samples, e.g. :class:`GPTSamples`) with global-batch sampling."""

    def __init__(self, train: Dataset, val: Dataset | None = None, test: Dataset | None = None, **kwargs: Any) -> None:
        """``kwargs`` are :class:`MegatronDataModule`'s (batch sizes, seed, workers, ramp-up)."""
        super().__init__(**kwargs)
        self.train_dataset, self.val_dataset, self.test_dataset = train, val, test
