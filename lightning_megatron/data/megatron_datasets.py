"""Datamodules over megatron-core's dataset builder: blends of indexed datasets, split into train/valid/test.

:class:`IndexedDataModule` checks the ``.bin/.idx`` files (and the model's vocabulary) first, then calls
``BlendedMegatronDatasetBuilder`` in every process (megatron-core requires it), and serves each split through
:class:`~lightning_megatron.data.sampler.GlobalBatchSampler`, so a resumed run continues at the next sample.
Subclasses say which megatron-core dataset class and config to build (GPT, BERT, T5).
"""

from __future__ import annotations

import abc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list
from torch.utils.data import Dataset

from lightning_megatron.data.datamodule import MegatronDataModule
from lightning_megatron.data.indexed import IndexedFiles, check_vocab_size, inspect_indexed
from lightning_megatron.data.tokenizer import LazyTokenizer, cache_dir
from lightning_megatron.errors import UserError

SPLITS = ("train", "validation", "test")


def parse_blend(paths: str | Sequence[str], weights: Sequence[float] | None = None) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) from prefixes plus weights, or from megatron's ``["0.7", "a", "0.3", "b"]`` form."""
    paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    if not paths:
        raise UserError("no data paths given: pass data.paths=[<prefix>, ...] (the --output-prefix of preprocess)")
    if weights is None:
        prefixes, parsed = get_blend_from_list(paths)
        return prefixes, None if parsed is None else [float(w) for w in parsed]
    if len(weights) != len(paths):
        raise UserError(f"{len(paths)} data paths but {len(weights)} weights; give one weight per path")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"blend weights must be non-negative and not all zero, got {list(weights)}")
    return paths, [float(w) for w in weights]


@contextmanager
def process_group_for_build() -> Iterator[None]:
    """A one-process gloo group while megatron-core builds datasets outside a trainer (its caching asks the rank)."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class IndexedDataModule(MegatronDataModule, LazyTokenizer, abc.ABC):
    """Base of the datamodules built from indexed datasets with megatron-core's ``BlendedMegatronDatasetBuilder``.

    ``paths`` are dataset prefixes (``<prefix>.bin``/``.idx``), optionally with blend ``weights`` (or megatron's
    interleaved ``["30", "a", "70", "b"]``); ``split`` divides each dataset's documents into train/valid/test.
    ``num_samples`` (train, valid, test) fixes how many samples each split yields (megatron repeats epochs as
    needed); by default train is ``trainer.max_steps × global_batch_size`` and valid/test one pass over their part,
    or ``eval_samples`` when set (required with blend weights, which need sizes). Index caches go to
    ``index_cache_dir`` (must be shared by all nodes of a multi-node run).
    """

    shuffle_train = False  # megatron-core's datasets shuffle their own sample order by ``seed``
    needs_sample_counts = False  # megatron-core's masked datasets cannot size themselves to one epoch
    split_by_documents = False  # megatron-core splits GPT data by sequence, masked data by document

    def __init__(
        self,
        paths: str | list[str] | None = None,
        weights: list[float] | None = None,
        split: str = "969,30,1",
        seq_length: int = 1024,
        tokenizer: str | None = None,
        index_cache_dir: str | None = None,
        num_samples: list[int | None] | None = None,
        eval_samples: int | None = None,
        check_vocab: bool = True,
        **kwargs: Any,
    ) -> None:
        """``kwargs`` are :class:`MegatronDataModule`'s (batch sizes, seed, workers, ramp-up)."""
        super().__init__(**kwargs)
        self.blend = parse_blend(paths, weights) if paths is not None else None
        self.split = split
        self.seq_length = seq_length
        self.tokenizer_spec = tokenizer
        self.index_cache_dir = index_cache_dir
        if num_samples is not None and len(num_samples) != 3:
            raise UserError(f"num_samples takes three sizes (train, valid, test), got {num_samples}")
        self.num_samples = num_samples
        self.eval_samples = eval_samples
        self.check_vocab = check_vocab

    @abc.abstractmethod
    def dataset_class(self) -> type:
        """The megatron-core dataset class to build (e.g. ``GPTDataset``)."""

    @abc.abstractmethod
    def dataset_config(self, **common: Any) -> BlendedMegatronDatasetConfig:
        """The megatron-core dataset config, given the fields common to all datasets."""

    def data_description(self) -> str:
        """The prefixes and split, for error messages."""
        prefixes = ", ".join(self.blend[0]) if self.blend else "mock data"
        return f"{prefixes} with split {self.split!r}"

    def _model_vocab_size(self) -> int | None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(getattr(module, "config", None), "vocab_size", None)

    def _sizes(self) -> list[int | None]:
        weighted = self.blend is not None and self.blend[1] is not None and len(self.blend[0]) > 1
        needs_counts = weighted or self.needs_sample_counts
        if self.num_samples is not None:
            if needs_counts and None in self.num_samples:
                raise UserError(
                    f"num_samples={self.num_samples}: {'blend weights' if weighted else type(self).__name__} need a "
                    f"count for every split (0 for a split you do not use)"
                )
            return list(self.num_samples)
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        train = max_steps * self.global_batch_size if max_steps and max_steps > 0 else None
        evaluation = self.eval_samples
        limit = getattr(self.trainer, "limit_val_batches", None)
        if needs_counts and evaluation is None and isinstance(limit, int):
            evaluation = limit * self.global_batch_size
        if needs_counts and (train is None or evaluation is None):
            reason = "blend weights" if weighted else f"{type(self).__name__}"
            raise UserError(
                f"{reason} need sample counts: set trainer.max_steps and either trainer.limit_val_batches "
                "(an integer) or data.eval_samples; or set data.num_samples=[train, valid, test]"
            )
        return [train, evaluation, evaluation]

    def build(self) -> list[Dataset | None]:
        """Check the files, then build (train, valid, test) with megatron-core; a split with no data is ``None``."""
        cache = Path(self.index_cache_dir) if self.index_cache_dir else cache_dir() / "indices"
        config = self.dataset_config(
            random_seed=self.seed,
            sequence_length=self.seq_length,
            blend=self.blend,
            split=self.split,
            path_to_cache=str(cache),
            tokenizer=self.tokenizer,
        )
        if self.blend is not None:
            for prefix in self.blend[0]:
                self._check_splits(inspect_indexed(prefix), config.split_matrix)
            vocab = self._model_vocab_size()
            if self.check_vocab and vocab is not None:
                check_vocab_size(self.blend[0], vocab)
        with process_group_for_build():
            datasets = BlendedMegatronDatasetBuilder(self.dataset_class(), self._sizes(), lambda: True, config).build()
        return [self.wrap(d) if d is not None and len(d) > 0 else None for d in datasets]

    def _check_splits(self, files: IndexedFiles, split_matrix: list) -> None:
        # megatron-core fails obscurely (or, for masked datasets, with an IndexError) on a split with no elements.
        total, unit = (files.num_documents, "documents") if self.split_by_documents else (files.num_sequences,
                                                                                          "sequences")
        for name, bounds in zip(SPLITS, split_matrix):
            if bounds is not None and int(round(bounds[1] * total)) == int(round(bounds[0] * total)):
                raise UserError(
                    f"the {name} split of {files.prefix}.idx is empty: split {self.split!r} gives it none of its "
                    f"{total} {unit}; change data.split (a 0 leaves a split out, e.g. '98,2,0') or add data"
                )

    def setup(self, stage: str) -> None:
        self.train_dataset, self.val_dataset, self.test_dataset = self.build()
        if stage == "fit" and self.train_dataset is None:
            raise UserError(f"the train split of {self.data_description()} is empty; add data or change the split")
