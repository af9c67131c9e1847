"""BLOOM (``BloomForCausalLM``) <-> our BLOOM-style :class:`~lightning_megatron.models.gpt.GPT`
(``GPTConfig.bloom``: ALiBi, a LayerNorm after the word embeddings, tanh GELU, biases, tied embeddings).

BLOOM's fused ``query_key_value`` is already laid out per head as ``[q_h, k_h, v_h]``, which is megatron's fused QKV
for multi-head attention, so every tensor copies unchanged. See docs/models.md for the full table.
"""

from __future__ import annotations

from typing import Any, Mapping

from lightning_megatron.convert.core import Architecture, ConversionError, Rule, same
from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.module import MegatronModule

DEFAULT_SEQ_LENGTH = 2048
"""BLOOM's training length; ALiBi has no position table, so HF configs do not record one."""


class Bloom(Architecture):
    """BigScience BLOOM and every HF checkpoint of ``BloomForCausalLM`` with the standard (pre-LN) residual."""

    name = "bloom"
    hf_architectures = ("BloomForCausalLM",)
    ignored_hf = ("lm_head.weight",)

    def config_from_hf(self, hf: Mapping[str, Any]) -> GPTConfig:
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ConversionError("BLOOM with apply_residual_connection_post_layernorm=True is not supported")
        if hf.get("slow_but_exact"):
            raise ConversionError("BLOOM with slow_but_exact=True (sliced pretraining-TP matmuls) is not supported; "
                                  "set it to false: the weights are the same")
        if not hf.get("tie_word_embeddings", True):
            raise ConversionError("BLOOM with untied embeddings (tie_word_embeddings=False) is not supported")
        # Older BLOOM configs name the sizes n_embed / num_attention_heads.
        hidden = hf.get("hidden_size", hf.get("n_embed"))
        return GPTConfig.bloom(
            vocab_size=hf["vocab_size"], num_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
            hidden_size=hidden, num_attention_heads=hf.get("n_head", hf.get("num_attention_heads")),
            ffn_hidden_size=4 * hidden, seq_length=hf.get("seq_length", DEFAULT_SEQ_LENGTH),
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5), init_method_std=hf.get("initializer_range", 0.02),
            hidden_dropout=hf.get("hidden_dropout", 0.0), attention_dropout=hf.get("attention_dropout", 0.0),
        )

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        if not self._is_bloom(config):
            raise ConversionError("this GPTConfig is not BLOOM shaped (needs ALiBi, an embedding LayerNorm, tanh "
                                  "GELU, biases, tied embeddings, multi-head attention and FFN = 4 x hidden)")
        return {
            "architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_attention_heads,
            "layer_norm_epsilon": config.layernorm_epsilon, "initializer_range": config.init_method_std,
            "hidden_dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout,
            "apply_residual_connection_post_layernorm": False, "slow_but_exact": False, "pretraining_tp": 1,
            "tie_word_embeddings": True, "seq_length": config.seq_length,
        }

    def rules(self, config: GPTConfig) -> list[Rule]:
        kinds = ("weight", "bias")
        layer = [("input_layernorm", "input_layernorm"),
                 ("self_attention.linear_qkv", "self_attention.query_key_value"),
                 ("self_attention.linear_proj", "self_attention.dense"),
                 ("pre_mlp_layernorm", "post_attention_layernorm"), ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
                 ("mlp.linear_fc2", "mlp.dense_4h_to_h")]
        names = [("embedding.word_embeddings.weight", "transformer.word_embeddings.weight")]
        names += [(f"embedding.layernorm.{k}", f"transformer.word_embeddings_layernorm.{k}") for k in kinds]
        names += [(f"decoder.layers.{i}.{ours}.{k}", f"transformer.h.{i}.{theirs}.{k}")
                  for i in range(config.num_layers) for ours, theirs in layer for k in kinds]
        names += [(f"decoder.final_layernorm.{k}", f"transformer.ln_f.{k}") for k in kinds]
        return [same(ours, theirs) for ours, theirs in names]

    def module(self, config: GPTConfig) -> MegatronModule:
        return GPT(config)

    def matches(self, module: MegatronModule) -> bool:
        return isinstance(module, GPT) and self._is_bloom(module.config)

    @staticmethod
    def _is_bloom(c: GPTConfig) -> bool:
        return (c.position_embedding_type == "alibi" and c.embedding_layernorm and c.normalization == "LayerNorm"
                and c.activation == "gelu_tanh" and c.add_bias_linear and c.tie_embeddings and not c.qk_layernorm
                and c.num_query_groups in (None, c.num_attention_heads)
                and (c.ffn_hidden_size or 4 * c.hidden_size) == 4 * c.hidden_size)
