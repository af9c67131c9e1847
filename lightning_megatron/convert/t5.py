"""T5 (``T5ForConditionalGeneration``, v1.0 ReLU and v1.1 gated-GELU) <-> our :class:`~lightning_megatron.models.t5.T5`.

Separate q/k/v become megatron's fused QKV (per head ``[q_h, k_h, v_h]``); cross attention's k/v become the fused
``linear_kv`` (per head ``[k_h, v_h]``); v1.1's ``wi_0``/``wi_1`` become the gated ``linear_fc1`` ``[gate; up]``.
HF keeps the relative position bias in the first block of each stack; megatron in ``*_relative_pos_emb``.
With tied embeddings HF scales the decoder output by ``d_model ** -0.5`` before the LM head (``scale_decoder_outputs``);
that factor is folded into the decoder's final RMSNorm weight and divided out on export (bit-exact when ``d_model``
is a power of 4, otherwise within one rounding).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lightning_megatron.convert.core import (
    Architecture,
    ConversionError,
    Rule,
    concatenated,
    fused_qkv,
    same,
    supported,
)
from lightning_megatron.models.t5 import T5 as T5Module
from lightning_megatron.models.t5 import T5Config
from lightning_megatron.module import MegatronModule

_ACTIVATIONS = {"relu": "relu", "gated-gelu": "gated-gelu"}


def _scaled(megatron: str, hf: str, factor: float) -> Rule:
    return Rule(megatron, (hf,), lambda w: w * factor, lambda w: (w / factor,))


class T5(Architecture):
    """Google T5 / T5 v1.1 / Flan-T5 shapes as HF ``T5ForConditionalGeneration``."""

    name = "t5"
    hf_architectures = ("T5ForConditionalGeneration",)
    ignored_hf = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def config_from_hf(self, hf: Mapping[str, Any]) -> T5Config:
        activation = supported(hf, "feed_forward_proj", "relu", _ACTIVATIONS, "T5")
        tie = bool(hf.get("tie_word_embeddings", True))
        if bool(hf.get("scale_decoder_outputs", tie)) != tie:
            raise ConversionError("T5 with scale_decoder_outputs different from tie_word_embeddings is not supported")
        return T5Config(
            vocab_size=hf["vocab_size"], num_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], hidden_size=hf["d_model"],
            num_attention_heads=hf["num_heads"], kv_channels=hf["d_kv"], ffn_hidden_size=hf["d_ff"],
            activation=activation,
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            tie_embeddings=tie,
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-6), hidden_dropout=hf.get("dropout_rate", 0.1),
            attention_dropout=hf.get("dropout_rate", 0.1), init_method_std=hf.get("initializer_factor", 1.0) * 0.02,
        )

    def config_to_hf(self, config: T5Config) -> dict[str, Any]:
        return {
            "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
            "d_model": config.hidden_size,
            "d_kv": config.kv_channels or config.hidden_size // config.num_attention_heads,
            "d_ff": config.ffn_hidden_size, "num_layers": config.num_layers,
            "num_decoder_layers": config.num_decoder_layers or config.num_layers,
            "num_heads": config.num_attention_heads, "feed_forward_proj": config.activation,
            "relative_attention_num_buckets": config.relative_attention_num_buckets,
            "relative_attention_max_distance": config.relative_attention_max_distance,
            "tie_word_embeddings": config.tie_embeddings, "scale_decoder_outputs": config.tie_embeddings,
            "layer_norm_epsilon": config.layernorm_epsilon,
            "dropout_rate": config.hidden_dropout, "is_encoder_decoder": True, "decoder_start_token_id": 0,
            "pad_token_id": 0,
        }

    def check_layout(self, config: T5Config, layout: Any) -> None:
        if layout.pipeline_model_parallel_size > 1:
            raise ConversionError("T5 does not support pipeline parallelism yet; use --pp 1")
        super().check_layout(config, layout)

    def rules(self, config: T5Config) -> list[Rule]:
        heads = config.num_attention_heads
        rules = [same("embedding.word_embeddings.weight", "shared.weight")]
        decoder_layers = config.num_decoder_layers or config.num_layers
        for stack, layers in (("encoder", config.num_layers), ("decoder", decoder_layers)):
            rules.append(same(f"{stack}_relative_pos_emb.relative_attention_bias.weight",
                              f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
            for i in range(layers):
                m, h = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
                attn = h + "0.SelfAttention."
                rules += [
                    same(m + "input_layernorm.weight", h + "0.layer_norm.weight"),
                    fused_qkv(m + "self_attention.linear_qkv.weight", attn + "q.weight", attn + "k.weight",
                              attn + "v.weight", heads, heads),
                    same(m + "self_attention.linear_proj.weight", attn + "o.weight"),
                ]
                ff = h + ("2" if stack == "decoder" else "1")
                if stack == "decoder":
                    cross = h + "1.EncDecAttention."
                    rules += [
                        same(m + "pre_cross_attn_layernorm.weight", h + "1.layer_norm.weight"),
                        same(m + "cross_attention.linear_q.weight", cross + "q.weight"),
                        _fused_kv(m + "cross_attention.linear_kv.weight", cross + "k.weight", cross + "v.weight",
                                  heads),
                        same(m + "cross_attention.linear_proj.weight", cross + "o.weight"),
                    ]
                rules.append(same(m + "pre_mlp_layernorm.weight", ff + ".layer_norm.weight"))
                if config.activation == "gated-gelu":
                    rules.append(concatenated(m + "mlp.linear_fc1.weight",
                                              (ff + ".DenseReluDense.wi_0.weight", ff + ".DenseReluDense.wi_1.weight")))
                else:
                    rules.append(same(m + "mlp.linear_fc1.weight", ff + ".DenseReluDense.wi.weight"))
                rules.append(same(m + "mlp.linear_fc2.weight", ff + ".DenseReluDense.wo.weight"))
            final = f"{stack}.final_layernorm.weight"
            if stack == "decoder" and config.tie_embeddings:
                rules.append(_scaled(final, "decoder.final_layer_norm.weight", config.hidden_size ** -0.5))
            else:
                rules.append(same(final, f"{stack}.final_layer_norm.weight"))
        if config.tie_embeddings:
            rules.append(Rule("lm_head.output_layer.bias", (), lambda: _zeros(config.vocab_size), lambda b: ()))
        else:
            rules.append(same("lm_head.output_layer.weight", "lm_head.weight"))
        return rules

    def module(self, config: T5Config) -> MegatronModule:
        return T5Module(config)

    def matches(self, module: MegatronModule) -> bool:
        return isinstance(module, T5Module)


def _zeros(rows: int) -> torch.Tensor:
    return torch.zeros(rows)


def _fused_kv(megatron: str, k: str, v: str, heads: int) -> Rule:
    """Cross attention's ``linear_kv``: per head ``[k_h, v_h]``."""

    def join(wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
        rest = wk.shape[1:]
        return torch.stack([wk.reshape(heads, -1, *rest), wv.reshape(heads, -1, *rest)], 1).reshape(-1, *rest)

    def split(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = w.shape[1:]
        per_head = w.reshape(heads, 2, -1, *rest)
        return per_head[:, 0].reshape(-1, *rest).contiguous(), per_head[:, 1].reshape(-1, *rest).contiguous()

    return Rule(megatron, (k, v), join, split)
