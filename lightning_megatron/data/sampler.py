"""Global-batch sampling: each data-parallel rank reads its slice of every global batch, resumable by sample count.

The order of samples depends only on the seed and the epoch, never on the parallel layout: the union of all
data-parallel ranks' batches at step ``k`` is the same global batch whatever the DP size, which is what makes runs
of different layouts compute the same loss. ``consumed_samples`` (read at the start of each pass) positions the
sampler, so a resumed run continues with the exact next batch, ramp-up of the global batch size included.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
from torch.utils.data import DataLoader, Sampler

from lightning_megatron.errors import UserError


class GlobalBatchSizes:
    """The global batch size as a function of consumed samples: fixed, or ramped up the way Megatron-LM does.

    ``rampup_batch_size=[start, increment, samples]`` grows the global batch from ``start`` by ``increment`` evenly
    over the first ``samples`` samples (megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator`` decides).
    """

    def __init__(self, global_batch_size: int, rampup_batch_size: Sequence[int] | None = None) -> None:
        self.global_batch_size = global_batch_size
        self._ramp = None
        if rampup_batch_size is not None:
            if len(rampup_batch_size) != 3:
                raise UserError("rampup_batch_size is [start, increment, ramp-up samples], e.g. [8, 8, 100000]")
            start, increment, samples = (int(v) for v in rampup_batch_size)
            if not 0 < start <= global_batch_size or increment <= 0 or (global_batch_size - start) % increment:
                raise UserError(
                    f"rampup_batch_size={list(rampup_batch_size)} must start at or below global_batch_size="
                    f"{global_batch_size} and reach it in whole increments"
                )
            if start < global_batch_size:
                self._ramp = RampupBatchsizeNumMicroBatchesCalculator(
                    global_batch_size, 1, 1, False, 1, start, increment, samples
                )

    def at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples`` samples."""
        if self._ramp is None:
            return self.global_batch_size
        self._ramp.update(consumed_samples, consistency_check=False)
        return self._ramp.get_current_global_batch_size()

    def sizes(self) -> list[int]:
        """Every global batch size the schedule passes through."""
        if self._ramp is None:
            return [self.global_batch_size]
        return list(range(self._ramp.start_global_batch_size, self.global_batch_size + 1,
                          self._ramp.batch_size_increment))

    def consumed_after(self, steps: int) -> int:
        """Samples consumed by the first ``steps`` optimizer steps."""
        if self._ramp is None:
            return steps * self.global_batch_size
        consumed = 0
        for _ in range(steps):
            consumed += self.at(consumed)
        return consumed


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's ``1 / dp_size`` share of each global batch (a global batch that no longer fits in the
    epoch is dropped, and the next epoch starts with a new permutation)."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int | GlobalBatchSizes,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        consumed_samples: Callable[[], int] = lambda: 0,
    ) -> None:
        sizes = global_batch_size if isinstance(global_batch_size, GlobalBatchSizes) else GlobalBatchSizes(
            global_batch_size)
        for size in sizes.sizes():
            if size % dp_size:
                raise UserError(f"global batch size {size} is not divisible by the data parallel size {dp_size}")
        if num_samples < sizes.global_batch_size:
            raise UserError(
                f"the dataset holds {num_samples} samples, fewer than one global batch of "
                f"{sizes.global_batch_size}; use more data or a smaller global_batch_size"
            )
        self.num_samples = num_samples
        self.sizes = sizes
        self.global_batch_size = sizes.global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.seed = seed
        self.consumed_samples = consumed_samples

    @property
    def batches_per_epoch(self) -> int:
        """Complete global batches in one pass over the data at the final global batch size."""
        return self.num_samples // self.global_batch_size

    def _position(self, consumed: int) -> tuple[int, int]:
        """(epoch, offset into that epoch's permutation) after ``consumed`` samples."""
        if self.sizes.sizes() == [self.global_batch_size]:
            epoch, done = divmod(consumed // self.global_batch_size, self.batches_per_epoch)
            return epoch, done * self.global_batch_size
        epoch, offset, walked = 0, 0, 0
        while walked < consumed:
            size = self.sizes.at(walked)
            if offset + size > self.num_samples:
                epoch, offset = epoch + 1, 0
                continue
            offset += size
            walked += size
        return epoch, offset

    def _epoch_batches(self, consumed: int, offset: int) -> Iterator[tuple[int, int]]:
        """(offset, global batch size) of each remaining global batch of the epoch."""
        while True:
            size = self.sizes.at(consumed)
            if offset + size > self.num_samples:
                return
            yield offset, size
            offset += size
            consumed += size

    def __len__(self) -> int:
        # A whole epoch, counted from its start: Lightning counts a resumed epoch's batches from where it stopped.
        consumed = self.consumed_samples()
        _, offset = self._position(consumed)
        return sum(1 for _ in self._epoch_batches(consumed - offset, 0))

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.consumed_samples()
        epoch, offset = self._position(consumed)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        for start, size in self._epoch_batches(consumed, offset):
            local = size // self.dp_size
            begin = start + self.dp_rank * local
            yield order[begin : begin + local].tolist()



class GlobalBatchLoader(DataLoader):
    """A ``DataLoader`` over a :class:`GlobalBatchSampler`, resumable by construction.

    Its position is the trainer's consumed samples, which the sampler reads at every pass, so it has no state of its
    own to save; implementing Lightning's ``state_dict``/``load_state_dict`` says so (a run resumed mid-epoch reads
    exactly the batches the uninterrupted run would have read).
    """

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the position comes from the trainer's step."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""
