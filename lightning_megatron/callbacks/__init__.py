"""Callbacks for training with the megatron strategy."""

from lightning_megatron.callbacks.progress import MegatronProgressBar
from lightning_megatron.callbacks.sample import SampleText
from lightning_megatron.callbacks.throughput import Throughput

__all__ = ["MegatronProgressBar", "SampleText", "Throughput"]
