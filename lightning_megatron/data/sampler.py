"""Global-batch sampling: each data-parallel rank reads its slice of every global batch, resumable by sample count.

The order of samples depends only on the seed and the epoch, never on the parallel layout: the union of all
data-parallel ranks' batches at step ``k`` is the same global batch whatever the DP size, which is what makes runs
of different layouts compute the same loss. ``consumed_samples`` (read at the start of each pass) positions the sampler, so a resumed run continues
with the exact next batch.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's ``global_batch_size / dp_size`` indices of each global batch (incomplete batches dropped)."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        consumed_samples: Callable[[], int] = lambda: 0,
    ) -> None:
        if global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by the data parallel size {dp_size}"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset holds {num_samples} samples, fewer than one global batch of {global_batch_size}; "
                f"use more data or a smaller global_batch_size"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.seed = seed
        self.consumed_samples = consumed_samples

    @property
    def batches_per_epoch(self) -> int:
        """Complete global batches in one pass over the data."""
        return self.num_samples // self.global_batch_size

    def __len__(self) -> int:
        # Always a whole epoch: Lightning counts a resumed epoch's batches from where it stopped.
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, done = divmod(self.consumed_samples() // self.global_batch_size, self.batches_per_epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        local = self.global_batch_size // self.dp_size
        for batch in range(done, self.batches_per_epoch):
            start = batch * self.global_batch_size + self.dp_rank * local
            yield order[start : start + local].tolist()
