"""T5: an encoder-decoder on megatron-core's ``T5Model`` with relative position biases, trained on span corruption.

Layers are pre-RMSNorm with T5's unscaled attention (``softmax_scale=1``) and relative position buckets, so HF
``T5ForConditionalGeneration`` checkpoints convert exactly. Pipeline parallelism is not supported: megatron-core
0.16's encoder/decoder pipeline split needs a decoder sequence length in the schedule that the strategy does not
pass yet (see docs/models.md); use TP and DP.

The batch contract: ``enc_tokens`` ``[batch, enc_seq]``, ``dec_tokens`` and ``labels`` ``[batch, dec_seq]``,
``loss_mask`` ``[batch, dec_seq]``, and optionally ``enc_mask`` ``[batch, enc_seq]`` (1 = real token).
:class:`~lightning_megatron.data.SpanCorruptionDataModule` builds such batches from a text corpus. megatron-core's key names (``text_enc``,
``text_dec``, as from ``lightning_megatron.data.MegatronT5DataModule``) are accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from megatron.core.models.T5.t5_model import T5Model
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.errors import UserError
from lightning_megatron.models.config import ModelConfig
from lightning_megatron.models.layers import (
    gelu_tanh,
    init_weights,
    t5_block_specs,
    token_losses_collecting_logits,
)
from lightning_megatron.models.lora import LoRAConfig
from lightning_megatron.module import MegatronModule
from lightning_megatron.optim import OptimConfig
from lightning_megatron.schedule import LossFn


@dataclass
class T5Config(ModelConfig):
    """The architecture of a T5; parallel layout and precision come from the strategy."""

    num_layers: int = 6
    """Encoder layers."""
    hidden_size: int = 512
    num_attention_heads: int = 8
    ffn_hidden_size: int = 2048
    layernorm_epsilon: float = 1e-6
    num_decoder_layers: int | None = None
    """Defaults to ``num_layers``."""
    kv_channels: int | None = None
    """Per-head size; defaults to hidden_size / num_attention_heads."""
    activation: Literal["relu", "gated-gelu"] = "relu"
    """``relu``: T5 v1.0; ``gated-gelu``: T5 v1.1 / Flan-T5 (tanh GELU gate)."""
    encoder_seq_length: int = 512
    decoder_seq_length: int = 128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_embeddings: bool = False

    @classmethod
    def tiny(cls, vocab_size: int, **overrides: Any) -> "T5Config":
        """2+2 layers, hidden 128, 4 heads: trains on a CPU in minutes."""
        return cls(**{**dict(vocab_size=vocab_size, num_layers=2, hidden_size=128, num_attention_heads=4,
                             ffn_hidden_size=256, encoder_seq_length=128, decoder_seq_length=64), **overrides})

    @classmethod
    def small(cls, vocab_size: int = 32128, **overrides: Any) -> "T5Config":
        """t5-small: 6+6 layers, hidden 512, 8 heads, FFN 2048, ReLU, tied embeddings."""
        return cls(**{**dict(vocab_size=vocab_size, tie_embeddings=True), **overrides})


class T5(MegatronModule):
    """A T5 trained with decoder cross entropy over ``loss_mask``."""

    def __init__(self, config: T5Config, optim: OptimConfig | None = None, lora: LoRAConfig | None = None,
                 init_from: str | None = None) -> None:
        super().__init__(config, optim, lora, init_from)

    def transformer_config(self, **fields: Any) -> TransformerConfig:
        c = self.config
        gated = c.activation == "gated-gelu"
        base: dict[str, Any] = dict(
            c.transformer_fields(), num_layers=c.num_decoder_layers or c.num_layers, kv_channels=c.kv_channels,
            normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=gated,
            activation_func=gelu_tanh if gated else F.relu, softmax_scale=1.0,
        )
        # megatron fuses only GeLU (as its tanh approximation) and SwiGLU: T5's ReLU / gated tanh-GeLU stay unfused.
        config = TransformerConfig(**{**base, **fields, "bias_activation_fusion": False})
        if config.pipeline_model_parallel_size > 1:
            raise UserError("T5 does not support pipeline_model_parallel_size > 1 yet; use tensor or data "
                            "parallelism (see docs/models.md)")
        return config

    def build_stage(self, config: TransformerConfig, pre_process: bool, post_process: bool,
                    vp_stage: int | None) -> T5Model:
        c = self.config
        encoder_config = TransformerConfig(**{**config.__dict__, "num_layers": c.num_layers})
        encoder, decoder = t5_block_specs(config, c.num_layers, c.num_decoder_layers or c.num_layers)
        model = T5Model(
            config=config, encoder_config=encoder_config, transformer_encoder_layer_spec=encoder,
            transformer_decoder_layer_spec=decoder, vocab_size=c.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=max(c.encoder_seq_length, c.decoder_seq_length), pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=c.tie_embeddings,
            position_embedding_type="relative", relative_attention_num_buckets=c.relative_attention_num_buckets,
            relative_attention_max_distance=c.relative_attention_max_distance,
        )
        init_weights(model, config, c.seed)
        return model

    def forward_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, LossFn]:
        enc_tokens = batch["enc_tokens"] if "enc_tokens" in batch else batch["text_enc"]
        dec_tokens = batch["dec_tokens"] if "dec_tokens" in batch else batch["text_dec"]
        enc_mask = batch.get("enc_mask")
        if enc_mask is None:
            enc_mask = torch.ones_like(enc_tokens)
        # True = blocked: padded encoder keys, for encoder self-attention and for cross attention.
        key_padding = (enc_mask == 0)[:, None, None, :]
        collect = self.collected_logits is not None
        labels = batch["labels"]
        output = model(enc_tokens, dec_tokens, key_padding, None, key_padding, lm_labels=None if collect else labels)

        def loss_fn(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            token_losses = token_losses_collecting_logits(output, labels, self.collected_logits, self.config.vocab_size)
            return self.loss(token_losses, batch)

        return output, loss_fn

    def loss(self, token_losses: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss sum, token count)`` over ``loss_mask``; override to weight tokens."""
        mask = batch["loss_mask"].float()
        return (token_losses.float() * mask).sum(), mask.sum()

    def sequence_length(self, batch: Mapping[str, torch.Tensor]) -> int:
        return (batch["enc_tokens"] if "enc_tokens" in batch else batch["text_enc"]).shape[1]
