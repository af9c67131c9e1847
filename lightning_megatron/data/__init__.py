"""Data: tokenizers, the bundled corpus, preprocessing, samplers and datamodules for the megatron strategy."""

from lightning_megatron.data.datamodule import MegatronDataModule, TextDataModule, TokenWindows
from lightning_megatron.data.gpt_dataset import MegatronGPTDataModule
from lightning_megatron.data.masked import MegatronBERTDataModule, MegatronT5DataModule
from lightning_megatron.data.masked_lm import MaskedLMDataModule, MaskedWindows
from lightning_megatron.data.samples import DatasetDataModule, GPTSamples
from lightning_megatron.data.sft import SFTDataModule
from lightning_megatron.data.span_corruption import SpanCorruption, SpanCorruptionDataModule
from lightning_megatron.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DatasetDataModule",
    "GPTSamples",
    "MaskedLMDataModule",
    "MaskedWindows",
    "MegatronBERTDataModule",
    "MegatronDataModule",
    "MegatronGPTDataModule",
    "MegatronT5DataModule",
    "SFTDataModule",
    "SpanCorruption",
    "SpanCorruptionDataModule",
    "TextDataModule",
    "TokenWindows",
    "Tokenizer",
    "load_tokenizer",
]
