"""LightningModules over megatron-core models."""

from lightning_megatron.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
