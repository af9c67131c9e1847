"""The architecture fields every model config shares, and megatron's padded vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion", "apply_rope_fusion")
"""megatron ``TransformerConfig`` switches of fused kernels: model configs set them for GPU runs, and the strategy
turns them all off on CPUs (whose runs keep the unfused math)."""


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
    # megatron-core builds these fusions with torch.compile: where the host is the bottleneck they cost more than they
    # save (GPT-2 124M at micro batch 8, eager: 0.58x with all of them on, H100), on the 1.3B preset they pay
    # (1.08x; benchmarks/train_throughput.py --cases fusions_all). Off unless asked for.
    bias_dropout_fusion: bool = False
    """GPU runs: megatron's fused bias + dropout + residual add."""
    cross_entropy_loss_fusion: bool = False
    """GPU runs: megatron's native fused vocabulary-parallel cross entropy."""
    bias_activation_fusion: bool = False
    """GPU runs: megatron's fused bias + SwiGLU or bias + tanh GeLU (``gelu_tanh``); erf GeLU stays unfused, since
    megatron's fused GeLU is the tanh approximation."""

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary rounded up so that it splits evenly into TP shards of a multiple of 128 rows (megatron's)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return math.ceil(self.vocab_size / multiple) * multiple

    def transformer_fields(self) -> dict[str, Any]:
        """The ``TransformerConfig`` fields these settings give, with megatron's own initialisation
        (:func:`~lightning_megatron.models.layers.init_weights` redraws every tensor) and the fusions switched on
        here (the strategy turns them off on CPUs)."""
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
            bias_activation_fusion=self.bias_activation_fusion,
            bias_dropout_fusion=self.bias_dropout_fusion,
            cross_entropy_loss_fusion=self.cross_entropy_loss_fusion,
            cross_entropy_fusion_impl="native",
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
        )
