"""GPT pretraining data: megatron-core's ``GPTDataset`` over blends of indexed datasets, or its mock dataset.

Batches follow the GPT batch contract: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[B, S]``);
megatron-core is told not to build an attention mask (the model's causal mask is implicit).
"""

from __future__ import annotations

from typing import Any

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from lightning_megatron.data.megatron_datasets import IndexedDataModule
from lightning_megatron.data.tokenizer import Tokenizer, load_tokenizer
from lightning_megatron.errors import UserError


class MegatronGPTDataModule(IndexedDataModule):
    """GPT samples of ``seq_length`` tokens from indexed datasets (``lightning-megatron preprocess`` output).

    ``mock=True`` serves megatron-core's synthetic ``MockGPTDataset`` instead (for benchmarks; no files needed).
    ``eod_mask_loss`` drops the loss on end-of-document targets; ``reset_position_ids`` restarts positions after
    each end-of-document token. See :class:`IndexedDataModule` for blending, splits and sample counts.
    """

    def __init__(
        self,
        paths: str | list[str] | None = None,
        weights: list[float] | None = None,
        split: str = "969,30,1",
        seq_length: int = 1024,
        tokenizer: str | None = None,
        global_batch_size: int = 16,
        micro_batch_size: int = 4,
        seed: int = 1234,
        index_cache_dir: str | None = None,
        num_samples: list[int | None] | None = None,
        eval_samples: int | None = None,
        mock: bool = False,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
        check_vocab: bool = True,
        num_workers: int = 0,
    ) -> None:
        if (paths is None) != mock:
            raise UserError("pass data paths (the --output-prefix of `lightning-megatron preprocess`) or mock=True")
        super().__init__(
            paths, weights, split, seq_length, tokenizer, global_batch_size, micro_batch_size, seed,
            index_cache_dir, num_samples, eval_samples, check_vocab, num_workers,
        )
        self.mock = mock
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids

    def load_tokenizer(self, spec: str | None) -> Tokenizer:
        return load_tokenizer(spec)

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
