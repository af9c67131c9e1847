"""Llama (``LlamaForCausalLM``, incl. grouped- and multi-query attention) <-> our Llama-style
:class:`~lightning_megatron.models.gpt.GPT`.

HF keeps q/k/v and gate/up as separate linears; megatron fuses them into ``linear_qkv`` (per query group: its query
heads, then its key and value head) and ``linear_fc1`` (``[gate; up]``). RoPE is the non-interleaved (rotate-half)
form in both. See docs/models.md for the full table.
"""

from __future__ import annotations

from typing import Any, Mapping

from lightning_megatron.convert.core import Architecture, ConversionError, Rule, concatenated, fused_qkv, same
from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.module import MegatronModule


class Llama(Architecture):
    """Meta Llama 2/3 shapes and every HF checkpoint of ``LlamaForCausalLM`` without RoPE scaling."""

    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    ignored_hf = ("rotary_emb.inv_freq",)

    def config_from_hf(self, hf: Mapping[str, Any]) -> GPTConfig:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                             **(hf.get("rope_scaling") or {})}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConversionError(f"Llama rope type {rope.get('rope_type', rope.get('type'))!r} (RoPE scaling) is "
                                  f"not supported; only the default RoPE converts exactly")
        if hf.get("head_dim") not in (None, hidden // heads):
            raise ConversionError(f"Llama head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads="
                                  f"{hidden // heads}, which our GPT requires")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConversionError("Llama with attention_bias or mlp_bias is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"Llama hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
        return GPTConfig.llama(
            vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], hidden_size=hidden,
            num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"], seq_length=hf.get("max_position_embeddings", 2048),
            rotary_base=int(rope.get("rope_theta", 10000.0)), layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_method_std=hf.get("initializer_range", 0.02), attention_dropout=hf.get("attention_dropout", 0.0),
        )

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size or 4 * config.hidden_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_query_groups or config.num_attention_heads,
            "head_dim": config.hidden_size // config.num_attention_heads,
            "max_position_embeddings": config.seq_length, "rms_norm_eps": config.layernorm_epsilon,
            "rope_parameters": {"rope_theta": float(config.rotary_base), "rope_type": "default"},
            "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "initializer_range": config.init_method_std,
            "attention_dropout": config.attention_dropout,
        }

    def rules(self, config: GPTConfig) -> list[Rule]:
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        rules = [same("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
        for i in range(config.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            rules += [
                same(m + "input_layernorm.weight", h + "input_layernorm.weight"),
                fused_qkv(m + "self_attention.linear_qkv.weight", h + "self_attn.q_proj.weight",
                          h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight", heads, groups),
                same(m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
                same(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
                concatenated(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")),
                same(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight"),
            ]
        rules.append(same("decoder.final_layernorm.weight", "model.norm.weight"))
        if not config.tie_embeddings:
            rules.append(same("output_layer.weight", "lm_head.weight"))
        return rules

    def module(self, config: GPTConfig) -> MegatronModule:
        return GPT(config)

    def matches(self, module: MegatronModule) -> bool:
        c = getattr(module, "config", None)
        return (isinstance(module, GPT) and c.normalization == "RMSNorm" and c.position_embedding_type == "rope"
                and c.activation == "swiglu" and not c.add_bias_linear and not c.qk_layernorm
                and not c.embedding_layernorm)
