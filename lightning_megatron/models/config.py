"""The architecture fields every model config shares, and megatron's padded vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """Fields GPT, BERT and T5 configs share; parallel layout and precision come from the strategy, not from here.

    Subclasses add their own fields and redeclare the defaults they change.
    """

    vocab_size: int
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None
    """Defaults to 4 x hidden_size."""
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    seed: int = 1234
    """Seeds the initial weights; the same seed gives the same weights under every parallel layout."""

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary rounded up so that it splits evenly into TP shards of a multiple of 128 rows (megatron's)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return math.ceil(self.vocab_size / multiple) * multiple

    def transformer_fields(self) -> dict[str, Any]:
        """The ``TransformerConfig`` fields these settings give, with megatron's own initialisation and fusions off
        (:func:`~lightning_megatron.models.layers.init_weights` redraws every tensor; the strategy turns fusions
        on where the device pays for them)."""
        return dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size or 4 * self.hidden_size,
            layernorm_epsilon=self.layernorm_epsilon,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            # init_weights redraws every tensor layout-invariantly; megatron's draw still marks the TP shards.
            perform_initialization=True,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
        )
