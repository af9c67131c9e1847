"""BERT: a bidirectional encoder on megatron-core's ``BertModel``, trained with masked-LM (+ sentence order) loss.

The layers are post-LayerNorm (``norm(x + sublayer(x))``) like Google's BERT and HF's ``BertModel``, and the
embeddings are followed by a LayerNorm, so HF checkpoints convert exactly; megatron-core's stock BERT is pre-LN.

The batch contract: a dict of ``[batch, seq]`` tensors - ``tokens``, ``labels`` (the original token at each
position), ``loss_mask`` (1.0 at the masked positions that count), ``padding_mask`` (1 for real tokens, 0 for
padding), optionally ``tokentype_ids``; with ``binary_head`` also ``sentence_order`` (``[batch]``, 1 = swapped).
:class:`~lightning_megatron.data.MaskedLMDataModule` builds such batches from a text corpus (the bundled one by default). megatron-core's
own key names (``text``, ``types``, ``is_random``, as from ``lightning_megatron.data.MegatronBERTDataModule``) are
accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer.transformer_config import TransformerConfig
from lightning_megatron.models.config import ModelConfig
from lightning_megatron.models.layers import Norm, add_embedding_norm, init_weights, post_ln_layer_spec
from lightning_megatron.models.lora import LoRAConfig
from lightning_megatron.module import MegatronModule
from lightning_megatron.optim import OptimConfig
from lightning_megatron.schedule import LossFn


@dataclass
class BertConfig(ModelConfig):
    """The architecture of a BERT encoder; parallel layout and precision come from the strategy."""

    layernorm_epsilon: float = 1e-12
    seq_length: int = 512
    """Maximum positions (learned absolute embeddings)."""
    num_tokentypes: int = 2
    binary_head: bool = False
    """Add the pooler and a two-way head trained on sentence order (NSP/SOP); its loss is added to the MLM loss."""

    @classmethod
    def tiny(cls, vocab_size: int, **overrides: Any) -> "BertConfig":
        """4 layers, 4 heads, hidden 128, 128 positions: trains on a CPU in minutes."""
        return cls(**{**dict(vocab_size=vocab_size, num_layers=4, hidden_size=128, num_attention_heads=4,
                             seq_length=128), **overrides})

    @classmethod
    def base(cls, vocab_size: int = 30522, **overrides: Any) -> "BertConfig":
        """BERT-base: 12 layers, 12 heads, hidden 768."""
        return cls(**{**dict(vocab_size=vocab_size), **overrides})

    @classmethod
    def large(cls, vocab_size: int = 30522, **overrides: Any) -> "BertConfig":
        """BERT-large: 24 layers, 16 heads, hidden 1024."""
        return cls(**{**dict(vocab_size=vocab_size, num_layers=24, hidden_size=1024, num_attention_heads=16),
                      **overrides})


class Bert(MegatronModule):
    """A BERT trained with masked-LM cross entropy over ``loss_mask`` (+ sentence-order loss with a binary head)."""

    def __init__(self, config: BertConfig, optim: OptimConfig | None = None, lora: LoRAConfig | None = None,
                 init_from: str | None = None) -> None:
        super().__init__(config, optim, lora, init_from)

    def transformer_config(self, **fields: Any) -> TransformerConfig:
        c = self.config
        # megatron's fused bias+GeLU is the tanh approximation, not BERT's GeLU: never fused.
        return TransformerConfig(**{**c.transformer_fields(), "activation_func": F.gelu, **fields,
                                    "bias_activation_fusion": False})

    def build_stage(self, config: TransformerConfig, pre_process: bool, post_process: bool,
                    vp_stage: int | None) -> BertModel:
        c = self.config
        model = BertModel(
            config=config, num_tokentypes=c.num_tokentypes, transformer_layer_spec=post_ln_layer_spec(config),
            vocab_size=c.padded_vocab_size(config.tensor_model_parallel_size), max_sequence_length=c.seq_length,
            pre_process=pre_process, post_process=post_process, share_embeddings_and_output_weights=True,
            add_binary_head=c.binary_head, vp_stage=vp_stage,
        )
        # Post-LN layers end normalised, so the block's final norm goes; BERT normalises the embeddings instead.
        model.encoder.final_layernorm = None
        if pre_process:
            add_embedding_norm(model, config, c.layernorm_epsilon)
        if post_process:
            model.lm_head.layer_norm = Norm(config, c.hidden_size, eps=c.layernorm_epsilon)
        init_weights(model, config, c.seed, tied_output_name="embedding.word_embeddings.weight")
        return model

    def forward_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[Any, LossFn]:
        collect = self.collected_logits is not None
        labels = batch["labels"]
        tokentype_ids = batch.get("tokentype_ids", batch.get("types"))
        output = model(_tokens(batch), batch["padding_mask"], tokentype_ids=tokentype_ids,
                       lm_labels=None if collect else labels)

        def loss_fn(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
            token_losses, binary_logits = output
            if collect:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(token_losses.detach())
                self.collected_logits.append(logits[..., : self.config.vocab_size].clone())
                token_losses = tensor_parallel.vocab_parallel_cross_entropy(token_losses.float(), labels)
            return self.loss(token_losses, binary_logits, batch)

        return output, loss_fn

    def loss(self, token_losses: torch.Tensor, binary_logits: torch.Tensor | None,
             batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss sum, token count)``: masked-LM over ``loss_mask``, plus the mean sentence-order loss.

        The sentence-order term is scaled by tokens per sample so that, after the strategy divides by the token
        count, it contributes its per-sample mean (as in BERT's pretraining loss).
        """
        mask = batch["loss_mask"].float()
        total, count = (token_losses.float() * mask).sum(), mask.sum()
        if binary_logits is not None:
            order = batch["sentence_order"] if "sentence_order" in batch else batch["is_random"]
            order = F.cross_entropy(binary_logits.float(), order.long(), reduction="sum")
            total = total + order * count / binary_logits.shape[0]
        return total, count

    def sequence_length(self, batch: Mapping[str, torch.Tensor]) -> int:
        return _tokens(batch).shape[1]


def _tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["tokens"] if "tokens" in batch else batch["text"]
