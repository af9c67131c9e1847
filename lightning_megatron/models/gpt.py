"""GPT: a decoder-only language model on megatron-core's ``GPTModel``, as a LightningModule.

The batch contract (see docs/module-contract.md): a dict of ``[batch, seq]`` tensors - ``tokens`` (input ids),
``labels`` (the next token at each position), ``loss_mask`` (1.0 where the token counts towards the loss), and
optionally ``position_ids`` and ``attention_mask`` (``[batch, 1, seq, seq]``, True where attention is *blocked*;
omit it for plain causal attention).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.backends import HAVE_TE
from lightning_megatron.models.config import ModelConfig
from lightning_megatron.models.layers import (
    add_embedding_norm,
    compiled_token_cross_entropy,
    gelu_tanh,
    gpt_block_spec,
    init_weights,
    token_losses_collecting_logits,
)
from lightning_megatron.models.lora import LoRAConfig
from lightning_megatron.module import MegatronModule
from lightning_megatron.optim import OptimConfig
from lightning_megatron.schedule import LossFn


@dataclass
class GPTConfig(ModelConfig):
    """The architecture of a GPT; parallel layout and precision come from the strategy, not from here."""

    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; ``None`` means one per attention head."""
    seq_length: int = 1024
    position_embedding_type: Literal["learned_absolute", "rope", "alibi"] = "learned_absolute"
    """``alibi``: no position embeddings; attention adds ALiBi's per-head linear bias (needs ``attention="sdpa"``)."""
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """``gelu_tanh`` is GPT-2's tanh approximation (HF ``gelu_new``), needed for exact parity with GPT-2 weights."""
    add_bias_linear: bool = True
    qk_layernorm: bool = False
    attention: Literal["sdpa", "local"] = "sdpa"
    """Core attention: PyTorch SDPA (fused kernels, context parallel) or megatron-core's local one."""
    tie_embeddings: bool = True
    embedding_layernorm: bool = False
    """A norm right after the word embeddings (BLOOM's ``word_embeddings_layernorm``)."""
    apply_rope_fusion: bool = True
    """GPU runs with Transformer Engine: fused RoPE (megatron's fused kernel needs TE; without it RoPE is unfused)."""
    layer_norm_fusion: bool = False
    """GPU runs: LayerNorms in our Triton kernels (:mod:`~lightning_megatron.models.layer_norm`; megatron's fused norms
    need Transformer Engine or Apex). Like megatron's fusions, off unless asked for: where the host is the bottleneck,
    a Triton launch costs more than torch's."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in fields(self):
            accepted = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is Literal else ()
            if accepted and getattr(self, field.name) not in accepted:
                raise ValueError(f"GPTConfig.{field.name}={getattr(self, field.name)!r} is not supported; "
                                 f"accepted: {', '.join(map(repr, accepted))}")

    @classmethod
    def tiny(cls, vocab_size: int, **overrides: Any) -> "GPTConfig":
        """4 layers, 4 heads, hidden 128: trains on a laptop CPU in minutes and splits up to TP4 or PP2 x VP2."""
        return cls(**{**dict(vocab_size=vocab_size, num_layers=4, hidden_size=128, num_attention_heads=4,
                             seq_length=128), **overrides})

    @classmethod
    def gpt2_124m(cls, vocab_size: int = 50257, **overrides: Any) -> "GPTConfig":
        """GPT-2 small, exactly OpenAI's architecture: 12 layers, 12 heads, hidden 768, tanh GeLU, learned positions,
        tied embeddings."""
        return cls(**{**dict(vocab_size=vocab_size, activation="gelu_tanh"), **overrides})

    @classmethod
    def gpt2_350m(cls, vocab_size: int = 50257, **overrides: Any) -> "GPTConfig":
        """GPT-2 medium: 24 layers, 16 heads, hidden 1024, tanh GeLU."""
        return cls.gpt2_124m(vocab_size, **{**dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
                                            **overrides})

    @classmethod
    def gpt2_1_3b(cls, vocab_size: int = 50257, **overrides: Any) -> "GPTConfig":
        """GPT-3 XL shape: 24 layers, 16 heads, hidden 2048, tanh GeLU (as GPT-2 and GPT-3)."""
        return cls.gpt2_124m(vocab_size, **{**dict(num_layers=24, hidden_size=2048, num_attention_heads=16),
                                            **overrides})

    @classmethod
    def llama(cls, vocab_size: int, **overrides: Any) -> "GPTConfig":
        """A Llama-style decoder: RoPE, RMSNorm, SwiGLU, no biases, untied embeddings (sizes from ``overrides``)."""
        defaults = dict(vocab_size=vocab_size, position_embedding_type="rope", normalization="RMSNorm",
                        activation="swiglu", add_bias_linear=False, tie_embeddings=False, layernorm_epsilon=1e-6)
        return cls(**{**defaults, **overrides})

    @classmethod
    def llama_tiny(cls, vocab_size: int, **overrides: Any) -> "GPTConfig":
        """A 4-layer Llama (hidden 128, 4 heads, 2 key/value groups) for laptops and tests."""
        return cls.llama(vocab_size, **{**dict(num_layers=4, hidden_size=128, num_attention_heads=4,
                                               num_query_groups=2, ffn_hidden_size=352, seq_length=128), **overrides})

    @classmethod
    def llama_3_2_1b(cls, vocab_size: int = 128256, **overrides: Any) -> "GPTConfig":
        """Llama-3.2-1B's shape: 16 layers, hidden 2048, 32 heads in 8 GQA groups, FFN 8192, tied embeddings.

        Llama 3.2's long-context RoPE frequency scaling is not modelled; positions up to 8192 match it exactly.
        """
        return cls.llama(vocab_size, **{**dict(num_layers=16, hidden_size=2048, num_attention_heads=32,
                                               num_query_groups=8, ffn_hidden_size=8192, seq_length=8192,
                                               rotary_base=500000, layernorm_epsilon=1e-5, tie_embeddings=True),
                                        **overrides})

    @classmethod
    def llama_3_8b(cls, vocab_size: int = 128256, **overrides: Any) -> "GPTConfig":
        """Llama-3-8B's shape: 32 layers, hidden 4096, 32 heads in 8 GQA groups, FFN 14336, untied embeddings."""
        return cls.llama(vocab_size, **{**dict(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                               num_query_groups=8, ffn_hidden_size=14336, seq_length=8192,
                                               rotary_base=500000, layernorm_epsilon=1e-5), **overrides})

    @classmethod
    def llama_2_7b(cls, vocab_size: int = 32000, **overrides: Any) -> "GPTConfig":
        """Llama-2-7B's shape: 32 layers, hidden 4096, 32 heads (multi-head attention), FFN 11008."""
        return cls.llama(vocab_size, **{**dict(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                               ffn_hidden_size=11008, seq_length=4096, layernorm_epsilon=1e-5),
                                        **overrides})

    @classmethod
    def bloom(cls, vocab_size: int = 250880, **overrides: Any) -> "GPTConfig":
        """A BLOOM-style decoder: ALiBi, a LayerNorm after the embeddings, tanh GELU, biases, tied embeddings; sizes
        of BLOOM-560m (24 layers, hidden 1024, 16 heads) unless ``overrides`` say otherwise."""
        defaults = dict(vocab_size=vocab_size, num_layers=24, hidden_size=1024, num_attention_heads=16,
                        seq_length=2048, position_embedding_type="alibi", embedding_layernorm=True,
                        activation="gelu_tanh")
        return cls(**{**defaults, **overrides})

    @classmethod
    def mqa_tiny(cls, vocab_size: int, **overrides: Any) -> "GPTConfig":
        """The tiny Llama with multi-query attention: one key/value head shared by all query heads."""
        return cls.llama_tiny(vocab_size, **{**dict(num_query_groups=1), **overrides})


class _GPTModel(GPTModel):
    """megatron's ``GPTModel`` whose fused cross entropy, without tensor parallelism, is
    :func:`~lightning_megatron.models.layers.token_cross_entropy` compiled (the same function in fewer passes)."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.config.cross_entropy_loss_fusion and self.config.tensor_model_parallel_size == 1:
            return compiled_token_cross_entropy(logits, labels.t()).t().contiguous()  # [s, b] logits, [b, s] labels
        return super().compute_language_model_loss(labels, logits)


class GPT(MegatronModule):
    """A GPT language model trained with next-token cross entropy (masked by ``loss_mask``).

    ``lora`` adds adapters and freezes the base weights; ``init_from`` starts from a checkpoint's weights (see
    docs/finetuning.md).
    """

    def __init__(self, config: GPTConfig, optim: OptimConfig | None = None, lora: LoRAConfig | None = None,
                 init_from: str | None = None) -> None:
        super().__init__(config, optim, lora, init_from)

    def transformer_config(self, **fields: Any) -> TransformerConfig:
        c = self.config
        swiglu = c.activation == "swiglu"
        activation = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "swiglu": F.silu}[c.activation]
        # megatron fuses bias + GeLU only when given F.gelu, with a kernel that computes the tanh approximation:
        # gelu_tanh's function exactly (erf GeLU never fuses). Its fused SwiGLU is exact, with or without a bias.
        tanh_gelu = c.activation == "gelu_tanh" and c.add_bias_linear
        fuse_activation = fields.get("bias_activation_fusion", c.bias_activation_fusion) and (swiglu or tanh_gelu)
        if fuse_activation and tanh_gelu:
            activation = F.gelu
        base: dict[str, Any] = dict(
            c.transformer_fields(),
            num_query_groups=c.num_query_groups,
            normalization=c.normalization,
            add_bias_linear=c.add_bias_linear,
            gated_linear_unit=swiglu,
            activation_func=activation,
            qk_layernorm=c.qk_layernorm,
            apply_rope_fusion=c.apply_rope_fusion and HAVE_TE and c.position_embedding_type == "rope",
        )
        return TransformerConfig(**{**base, **fields, "bias_activation_fusion": fuse_activation})

    def build_stage(
        self, config: TransformerConfig, pre_process: bool, post_process: bool, vp_stage: int | None
    ) -> GPTModel:
        c = self.config
        alibi = c.position_embedding_type == "alibi"
        model = _GPTModel(
            config=config,
            transformer_layer_spec=gpt_block_spec(config, vp_stage, qk_layernorm=c.qk_layernorm, attention=c.attention,
                                                  alibi=alibi, fused_norm=c.layer_norm_fusion),
            vocab_size=c.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=c.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=c.tie_embeddings,
            position_embedding_type="none" if alibi else c.position_embedding_type,
            rotary_base=c.rotary_base,
            vp_stage=vp_stage,
        )
        if pre_process and c.embedding_layernorm:
            add_embedding_norm(model, config, c.layernorm_epsilon)
        init_weights(model, config, c.seed, tied_output_name="embedding.word_embeddings.weight" if c.tie_embeddings else None)
        return model

    def forward_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, LossFn]:
        """Run one chunk on a microbatch; the last stage's loss goes through :meth:`loss`.

        While :attr:`collected_logits` is a list, the model returns logits instead of token losses; the loss is
        then computed from them here (the same cross entropy) and each microbatch's ``[batch, seq, vocab_size]``
        logits, gathered over tensor parallelism, are appended to the list on the last pipeline stage.
        """
        tokens = batch["tokens"]
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        collect = self.collected_logits is not None
        labels = batch["labels"]
        output = model(tokens, position_ids, batch.get("attention_mask"), labels=None if collect else labels)

        def loss_fn(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            token_losses = token_losses_collecting_logits(output, labels, self.collected_logits, self.config.vocab_size)
            return self.loss(token_losses, batch)

        return output, loss_fn

    def loss(self, token_losses: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce ``[batch, seq]`` per-token losses to ``(loss sum, token count)``; override to weight tokens.

        The strategy divides the sum over the global batch by the count, so returning ``(sum(w * l), sum(w))``
        trains on the ``w``-weighted mean whatever the parallel layout (see docs/models.md).
        """
        mask = batch["loss_mask"].float()
        return (token_losses.float() * mask).sum(), mask.sum()
