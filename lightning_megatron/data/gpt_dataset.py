"""GPT pretraining data: megatron-core's ``GPTDataset`` over blends of indexed datasets, or its mock dataset.

Batches follow the GPT batch contract: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[B, S]``);
megatron-core is told not to build an attention mask (the model's causal mask is implicit).
"""

from __future__ import annotations

from typing import Any

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from lightning_megatron.data.megatron_datasets import IndexedDataModule
from lightning_megatron.errors import UserError


class MegatronGPTDataModule(IndexedDataModule):
    """GPT samples of ``seq_length`` tokens from indexed datasets (``lightning-megatron preprocess`` output).

    ``mock=True`` serves megatron-core's synthetic ``MockGPTDataset`` instead (for benchmarks; no files needed).
    ``eod_mask_loss`` drops the loss on end-of-document targets; ``reset_position_ids`` restarts positions after
    each end-of-document token. See :class:`IndexedDataModule` for blending, splits and sample counts.
    """

    def __init__(self, paths: str | list[str] | None = None, *, mock: bool = False, eod_mask_loss: bool = False,
                 reset_position_ids: bool = False, **kwargs: Any) -> None:
        """``kwargs`` are :class:`IndexedDataModule`'s (``seq_length``, ``tokenizer``, batch sizes, ...)."""
        if (paths is None) != mock:
            raise UserError("pass data paths (the --output-prefix of `lightning-megatron preprocess`) or mock=True")
        super().__init__(paths=paths, **kwargs)
        self.mock = mock
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids

    def dataset_class(self) -> type:
        return MockGPTDataset if self.mock else GPTDataset

    def dataset_config(self, **common: Any) -> GPTDatasetConfig:
        return GPTDatasetConfig(
            **common,
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=False,
            eod_mask_loss=self.eod_mask_loss,
            create_attention_mask=False,
        )
