"""GPT-2 (``GPT2LMHeadModel``) <-> our :class:`~lightning_megatron.models.gpt.GPT`.

GPT-2 stores its linear layers as ``Conv1D`` (``[in, out]``, transposed against megatron's ``[out, in]``) and its
attention as one ``c_attn`` of ``[all queries | all keys | all values]``, which megatron wants per head as
``[q_h, k_h, v_h]``. Embeddings are tied. See docs/models.md for the full table.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lightning_megatron.convert.core import Architecture, ConversionError, Rule, same, supported, transposed
from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.module import MegatronModule

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _c_attn(megatron: str, hf: str, heads: int) -> Rule:
    """Fused ``[q | k | v]`` Conv1D weight (``[in, 3h]``) or bias (``[3h]``) <-> megatron's per-head QKV."""

    def join(w: torch.Tensor) -> torch.Tensor:
        w = w.t() if w.ndim == 2 else w
        rest = w.shape[1:]
        return w.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest).contiguous()

    def split(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = w.shape[1:]
        fused = w.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)
        return ((fused.t() if fused.ndim == 2 else fused).contiguous(),)

    return Rule(megatron, (hf,), join, split)


class GPT2(Architecture):
    """OpenAI GPT-2 and every HF checkpoint of ``GPT2LMHeadModel``."""

    name = "gpt2"
    hf_architectures = ("GPT2LMHeadModel",)
    ignored_hf = (".attn.bias", ".attn.masked_bias")

    def config_from_hf(self, hf: Mapping[str, Any]) -> GPTConfig:
        activation = supported(hf, "activation_function", "gelu_new", _ACTIVATIONS, "GPT-2")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if hf.get(flag):
                raise ConversionError(f"GPT-2 with {flag}=True is not supported")
        if not hf.get("tie_word_embeddings", True):
            raise ConversionError("GPT-2 with untied embeddings (tie_word_embeddings=False) is not supported")
        hidden = hf["n_embd"]
        return GPTConfig.gpt2_124m(
            vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], hidden_size=hidden,
            num_attention_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
            seq_length=hf["n_positions"], layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=activation, init_method_std=hf.get("initializer_range", 0.02),
            hidden_dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
        )

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        if not self._is_gpt2(config):
            raise ConversionError("this GPTConfig is not GPT-2 shaped (needs LayerNorm, learned positions, GELU, "
                                  "biases and tied embeddings)")
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.seq_length, "n_embd": config.hidden_size, "n_layer": config.num_layers,
            "n_head": config.num_attention_heads, "n_inner": config.ffn_hidden_size or 4 * config.hidden_size,
            "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": config.layernorm_epsilon, "initializer_range": config.init_method_std,
            "resid_pdrop": config.hidden_dropout, "embd_pdrop": config.hidden_dropout,
            "attn_pdrop": config.attention_dropout, "tie_word_embeddings": True,
        }

    def rules(self, config: GPTConfig) -> list[Rule]:
        heads = config.num_attention_heads
        rules = [same("embedding.word_embeddings.weight", "transformer.wte.weight"),
                 same("embedding.position_embeddings.weight", "transformer.wpe.weight")]
        for i in range(config.num_layers):
            m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
            rules += [
                same(m + "input_layernorm.weight", h + "ln_1.weight"),
                same(m + "input_layernorm.bias", h + "ln_1.bias"),
                _c_attn(m + "self_attention.linear_qkv.weight", h + "attn.c_attn.weight", heads),
                _c_attn(m + "self_attention.linear_qkv.bias", h + "attn.c_attn.bias", heads),
                transposed(m + "self_attention.linear_proj.weight", h + "attn.c_proj.weight"),
                same(m + "self_attention.linear_proj.bias", h + "attn.c_proj.bias"),
                same(m + "pre_mlp_layernorm.weight", h + "ln_2.weight"),
                same(m + "pre_mlp_layernorm.bias", h + "ln_2.bias"),
                transposed(m + "mlp.linear_fc1.weight", h + "mlp.c_fc.weight"),
                same(m + "mlp.linear_fc1.bias", h + "mlp.c_fc.bias"),
                transposed(m + "mlp.linear_fc2.weight", h + "mlp.c_proj.weight"),
                same(m + "mlp.linear_fc2.bias", h + "mlp.c_proj.bias"),
            ]
        rules += [same("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
                  same("decoder.final_layernorm.bias", "transformer.ln_f.bias")]
        return rules

    def module(self, config: GPTConfig) -> MegatronModule:
        return GPT(config)

    def matches(self, module: MegatronModule) -> bool:
        return isinstance(module, GPT) and self._is_gpt2(module.config)

    @staticmethod
    def _is_gpt2(c: GPTConfig) -> bool:
        return (c.normalization == "LayerNorm" and c.position_embedding_type == "learned_absolute"
                and c.activation in ("gelu", "gelu_tanh") and c.add_bias_linear and c.tie_embeddings
                and not c.qk_layernorm and not c.embedding_layernorm
                and c.num_query_groups in (None, c.num_attention_heads))
