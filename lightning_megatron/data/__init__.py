"""Data: tokenizers, the bundled corpus, samplers and datamodules for the megatron strategy."""

from lightning_megatron.data.datamodule import MegatronDataModule, TextDataModule, TokenWindows
from lightning_megatron.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["MegatronDataModule", "TextDataModule", "TokenWindows", "Tokenizer", "load_tokenizer"]
