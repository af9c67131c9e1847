"""BERT (``BertForMaskedLM``, ``BertForPreTraining``, ``BertModel``) <-> our
:class:`~lightning_megatron.models.bert.Bert`.

Our BERT layers are post-LN like HF's, so every HF norm has a counterpart: the attention output LayerNorm is the
norm of the attention's ``self_attn_bda``, the layer output LayerNorm that of ``mlp_bda``. Separate q/k/v become
megatron's fused QKV (per head ``[q_h, k_h, v_h]``). The MLM decoder is tied to the word embeddings and keeps its
bias; ``BertForPreTraining``'s pooler and next-sentence head become the pooler and binary head. A ``BertModel``
(the encoder alone) imports with fresh heads (:class:`BertEncoder`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Collection, Mapping

import torch

from lightning_megatron.convert.core import Architecture, ConversionError, Rule, fused_qkv, same
from lightning_megatron.models.bert import Bert as BertModule
from lightning_megatron.models.bert import BertConfig
from lightning_megatron.models.layers import initial_weight
from lightning_megatron.module import MegatronModule


class Bert(Architecture):
    """Google BERT and every HF ``BertForMaskedLM`` / ``BertForPreTraining`` checkpoint with absolute positions."""

    name = "bert"
    hf_architectures = ("BertForMaskedLM", "BertForPreTraining")
    ignored_hf = ("position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def config_from_hf(self, hf: Mapping[str, Any]) -> BertConfig:
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ConversionError(f"BERT hidden_act={hf['hidden_act']!r} is not supported; only 'gelu'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("BERT with relative position embeddings is not supported")
        return BertConfig(
            vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
            seq_length=hf["max_position_embeddings"], num_tokentypes=hf.get("type_vocab_size", 2),
            binary_head="BertForPreTraining" in (hf.get("architectures") or []),
            layernorm_epsilon=hf.get("layer_norm_eps", 1e-12), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            init_method_std=hf.get("initializer_range", 0.02),
        )

    def config_to_hf(self, config: BertConfig) -> dict[str, Any]:
        return {
            "architectures": ["BertForPreTraining" if config.binary_head else "BertForMaskedLM"],
            "model_type": "bert", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.ffn_hidden_size or 4 * config.hidden_size,
            "max_position_embeddings": config.seq_length, "type_vocab_size": config.num_tokentypes,
            "layer_norm_eps": config.layernorm_epsilon, "hidden_act": "gelu",
            "hidden_dropout_prob": config.hidden_dropout, "attention_probs_dropout_prob": config.attention_dropout,
            "initializer_range": config.init_method_std, "tie_word_embeddings": True,
        }

    def rules(self, config: BertConfig) -> list[Rule]:
        rules = _encoder(config, "bert.")
        for kind in ("weight", "bias"):
            rules += [same(f"lm_head.dense.{kind}", f"cls.predictions.transform.dense.{kind}"),
                      same(f"lm_head.layer_norm.{kind}", f"cls.predictions.transform.LayerNorm.{kind}")]
        rules.append(same("output_layer.bias", "cls.predictions.bias"))
        if config.binary_head:
            for kind in ("weight", "bias"):
                rules += [same(f"pooler.dense.{kind}", f"bert.pooler.dense.{kind}"),
                          same(f"binary_head.{kind}", f"cls.seq_relationship.{kind}")]
        return rules

    def module(self, config: BertConfig) -> MegatronModule:
        return BertModule(config)

    def matches(self, module: MegatronModule) -> bool:
        return isinstance(module, BertModule)


class BertEncoder(Bert):
    """HF ``BertModel`` checkpoints (the encoder, with or without its pooler, no pretraining heads): the form most
    published BERT-family encoders ship in.

    Our BERT always has an MLM head (and, with a pooler, megatron's binary head beside it); the import adds them
    fresh, exactly as a new :class:`~lightning_megatron.models.bert.Bert` of the config's seed would start (normal(0,
    ``initializer_range``) weights, zero biases, unit norms), ready to be fine-tuned. Exporting writes the encoder
    (and pooler) alone, so ``BertModel`` round-trips bit for bit.
    """

    name = "bert-encoder"
    hf_architectures = ("BertModel",)
    ignored_hf = ("position_ids",)

    def config_for_weights(self, config: BertConfig, names: Collection[str]) -> BertConfig:
        # HF's BertModel and megatron's BertModel both keep the pooler under this name.
        return replace(config, binary_head="pooler.dense.weight" in names)

    def config_to_hf(self, config: BertConfig) -> dict[str, Any]:
        return {**super().config_to_hf(config), "architectures": ["BertModel"]}

    def rules(self, config: BertConfig) -> list[Rule]:
        hidden, seed, std = config.hidden_size, config.seed, config.init_method_std
        rules = _encoder(config, "") + [
            _fresh("lm_head.dense.weight", initial_weight("lm_head.dense.weight", (hidden, hidden), std, seed)),
            _fresh("lm_head.dense.bias", torch.zeros(hidden)),
            _fresh("lm_head.layer_norm.weight", torch.ones(hidden)),
            _fresh("lm_head.layer_norm.bias", torch.zeros(hidden)),
            _fresh("output_layer.bias", torch.zeros(config.vocab_size)),
        ]
        if config.binary_head:
            rules += [same(f"pooler.dense.{kind}", f"pooler.dense.{kind}") for kind in ("weight", "bias")]
            rules += [_fresh("binary_head.weight", initial_weight("binary_head.weight", (2, hidden), std, seed)),
                      _fresh("binary_head.bias", torch.zeros(2))]
        return rules


def _fresh(megatron: str, value: torch.Tensor) -> Rule:
    """A tensor the HF model lacks: ``value`` on import, nothing on export."""
    return Rule(megatron, (), lambda: value, lambda _: ())


def _encoder(config: BertConfig, prefix: str) -> list[Rule]:
    """The embeddings and layers, under HF names starting with ``prefix`` (``bert.`` inside the pretraining
    models, nothing in ``BertModel``)."""
    heads = config.num_attention_heads
    e = prefix + "embeddings."
    rules = [same("embedding.word_embeddings.weight", e + "word_embeddings.weight"),
             same("embedding.position_embeddings.weight", e + "position_embeddings.weight"),
             same("embedding.tokentype_embeddings.weight", e + "token_type_embeddings.weight"),
             same("embedding.layernorm.weight", e + "LayerNorm.weight"),
             same("embedding.layernorm.bias", e + "LayerNorm.bias")]
    for i in range(config.num_layers):
        m, h = f"encoder.layers.{i}.", f"{prefix}encoder.layer.{i}."
        attn = h + "attention.self."
        for kind in ("weight", "bias"):
            rules += [
                fused_qkv(m + f"self_attention.linear_qkv.{kind}", attn + f"query.{kind}", attn + f"key.{kind}",
                          attn + f"value.{kind}", heads, heads),
                same(m + f"self_attention.linear_proj.{kind}", h + f"attention.output.dense.{kind}"),
                same(m + f"self_attn_bda.norm.{kind}", h + f"attention.output.LayerNorm.{kind}"),
                same(m + f"mlp.linear_fc1.{kind}", h + f"intermediate.dense.{kind}"),
                same(m + f"mlp.linear_fc2.{kind}", h + f"output.dense.{kind}"),
                same(m + f"mlp_bda.norm.{kind}", h + f"output.LayerNorm.{kind}"),
            ]
    return rules
