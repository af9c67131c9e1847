"""Layer specs and weight initialisation shared by our megatron-core models.

The specs compose megatron-core's local (non-Transformer-Engine) modules and swap in :class:`Norm`, a torch norm
that supports sequence parallelism, so SP runs on CPUs and on GPUs without Transformer Engine or Apex.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.T5.t5_spec import decoder_model_with_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, LinearWithGradAccumulationAndAsyncCommunication
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.errors import UserError
from lightning_megatron.models.attention import SDPAttention
from lightning_megatron.models.layer_norm import FusedLayerNorm


def token_losses_collecting_logits(
    output: torch.Tensor, labels: torch.Tensor, collected: list[torch.Tensor] | None, vocab_size: int
) -> torch.Tensor:
    """Per-token losses of a language-model head; with ``collected``, ``output`` is vocab-parallel logits, which are
    gathered over TP, cut to the real vocabulary and appended to ``collected`` before the loss is computed."""
    if collected is None:
        return output
    # Gather first: megatron's vocab-parallel cross entropy works in place on the logits it is given.
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach())
    collected.append(logits[..., :vocab_size].clone())
    return tensor_parallel.vocab_parallel_cross_entropy(output.float(), labels)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy, in fp32, of whole-vocabulary ``[..., vocab]`` logits against ``[...]`` labels; a
    label outside the vocabulary (a masked position) is treated as megatron's vocab-parallel cross entropy does: its
    target is the row's largest logit, through which no gradient flows."""
    logits = logits.float()
    inside = (labels >= 0) & (labels < logits.shape[-1])
    target = logits.gather(-1, torch.where(inside, labels, 0).unsqueeze(-1)).squeeze(-1)
    largest = logits.detach().amax(dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.where(inside, target, largest)


# Compiled, the forward reads the bf16 logits once and the backward writes their gradient in one pass; megatron's
# native fused cross entropy keeps fp32 copies of the logits (a quarter of GPT-2 124M's step with CUDA graphs on an
# H100, benchmarks/profile_step.py).
compiled_token_cross_entropy = torch.compile(token_cross_entropy, dynamic=False)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as GPT-2 was trained."""
    return F.gelu(x, approximate="tanh")


class Norm:
    """A torch ``LayerNorm``/``RMSNorm`` built from a megatron config, usable with sequence parallelism.

    ``fused``: a LayerNorm runs our Triton kernels on GPUs (:class:`~lightning_megatron.models.layer_norm.FusedLayerNorm`).

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so the norm's gradients are
    partial sums: marking the parameters ``sequence_parallel`` makes megatron's ``finalize_model_grads`` all-reduce
    them across the TP group, as it does for Transformer Engine's norms.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, fused: bool = False,
                **_: object) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = (FusedLayerNorm if fused else torch.nn.LayerNorm)(hidden_size, eps=eps)
        else:
            raise UserError(f"normalization={config.normalization!r} is not supported; use 'LayerNorm' or 'RMSNorm'")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class _LinearAddingBiasInGemm(LinearWithGradAccumulationAndAsyncCommunication):
    """megatron's linear autograd function with the bias added by the GEMM itself (``torch.addmm``, a cuBLASLt
    epilogue on GPUs) instead of by a broadcast add over the whole output afterwards, which was 13 ms of the 1.3B
    preset's 538 ms step on an H100 (``benchmarks/profile_step.py``). Only without sequence parallelism or deferred
    weight gradients; the backward is megatron's, so the forward sets the context fields it reads."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # megatron's backward is a custom_bwd, which reads what this records
    def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                grad_output_buffer, wgrad_deferral_limit, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        ctx.use_bias = True
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.wgrad_deferral_limit = wgrad_deferral_limit
        ctx.grad_output_buffer = grad_output_buffer
        ctx.tp_group = tp_group
        output = torch.addmm(bias, input.reshape(-1, input.shape[-1]), weight.t())
        return output.view(*input.shape[:-1], output.shape[-1])


class BiasInGemmColumnParallelLinear(ColumnParallelLinear):
    """megatron's ``ColumnParallelLinear`` that adds its bias inside the GEMM (see :class:`_LinearAddingBiasInGemm`);
    the attention's fused QKV projection, the one linear layer of megatron's local spec that adds its own bias."""

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      **kwargs):
        # megatron's own path for what the override does not cover (its sequence-parallel all-gather, deferred weight
        # gradients, frozen weights).
        covered = (bias is not None and weight.requires_grad and not sequence_parallel and grad_output_buffer is None
                   and tp_group is not None and not kwargs)
        if not covered:
            return super()._forward_impl(
                input, weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit, tp_group=tp_group,
                **kwargs)
        return _LinearAddingBiasInGemm.apply(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                             sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group)


def with_bias_in_gemm(self_attention: ModuleSpec) -> ModuleSpec:
    """A self-attention spec whose QKV projection is a :class:`BiasInGemmColumnParallelLinear`."""
    submodules = dataclasses.replace(self_attention.submodules, linear_qkv=BiasInGemmColumnParallelLinear)
    return dataclasses.replace(self_attention, submodules=submodules)


def add_embedding_norm(model: torch.nn.Module, config: TransformerConfig, eps: float) -> None:
    """Normalise the output of ``model.embedding`` with a :class:`Norm` registered as ``embedding.layernorm``."""
    model.embedding.add_module("layernorm", Norm(config, config.hidden_size, eps=eps))
    model.embedding.register_forward_hook(lambda module, args, output: module.layernorm(output))


AttentionBackend = Literal["sdpa", "local"]
"""``sdpa``: :class:`~lightning_megatron.models.attention.SDPAttention` (fused kernels, context parallel);
``local``: megatron-core's ``DotProductAttention`` (explicit softmax, no context parallelism)."""


def norm_spec(fused: bool) -> ModuleSpec | type:
    """:class:`Norm`, its LayerNorm in our Triton kernels on GPUs if ``fused``."""
    return ModuleSpec(module=Norm, params={"fused": True}) if fused else Norm


def gpt_layer_spec(qk_layernorm: bool = False, attention: AttentionBackend = "sdpa", alibi: bool = False,
                   fused_norm: bool = False) -> ModuleSpec:
    """megatron-core's local GPT layer spec with :class:`Norm` in place of its norms (``fused_norm``: see
    :func:`norm_spec`) and a choice of core attention (``alibi``: :class:`SDPAttention` adds ALiBi's linear bias)."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm)
    self_attention = spec.submodules.self_attention
    replaced: dict = {}
    if qk_layernorm:
        replaced.update(q_layernorm=Norm, k_layernorm=Norm)
    if attention == "sdpa":
        replaced["core_attention"] = ModuleSpec(module=SDPAttention, params={"alibi": True}) if alibi else SDPAttention
    elif attention != "local":
        raise UserError(f"attention={attention!r} is not one of 'sdpa', 'local'")
    elif alibi:
        raise UserError("ALiBi needs attention='sdpa' (megatron-core's local attention takes no position bias)")
    self_attention = with_bias_in_gemm(dataclasses.replace(
        self_attention, submodules=dataclasses.replace(self_attention.submodules, **replaced)
    ))
    norm = norm_spec(fused_norm)
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm, self_attention=self_attention
    )
    return dataclasses.replace(spec, submodules=submodules)


def gpt_block_spec(
    config: TransformerConfig, vp_stage: int | None, qk_layernorm: bool = False, attention: AttentionBackend = "sdpa",
    alibi: bool = False, fused_norm: bool = False,
) -> TransformerBlockSubmodules:
    """The decoder block of one pipeline stage (or virtual stage): its layers and a final :class:`Norm`."""
    if attention == "local" and config.context_parallel_size > 1:
        raise UserError("context parallelism needs attention='sdpa' (megatron-core's local attention refuses it)")
    layer = gpt_layer_spec(qk_layernorm, attention, alibi, fused_norm)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=norm_spec(fused_norm)
    )


_LOCAL_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def global_name(name: str, module: torch.nn.Module) -> str:
    """A parameter's name in the whole (unsplit) model: a pipeline stage's local layer indices become global ones."""
    match = _LOCAL_LAYER.search(name)
    if match is None:
        return name
    block_name = name[: match.start(1)] + match.group(1)
    layer = module.get_submodule(block_name.lstrip("."))
    return name[: match.start(1)] + str(layer.layer_number - 1) + name[match.end(1) :]


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def initial_weight(name: str, shape: Sequence[int], std: float, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The initial value :func:`init_weights` gives the full (unsplit) matrix ``name``: normal(0, ``std``)."""
    generator = torch.Generator(device).manual_seed(_seed_for(seed, name))
    return torch.empty(list(shape), device=device).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(model: torch.nn.Module, config: TransformerConfig, seed: int, tied_output_name: str | None = None) -> None:
    """Initialise every parameter from a generator keyed on (seed, global parameter name).

    megatron-core draws weights from one RNG stream per pipeline stage, so a PP=2 model starts from other weights
    than a single process. Keying each tensor on its global name makes the initial model identical under every
    TP/PP/VP layout, which is what lets runs of different layouts be compared. The draw happens on the parameter's
    device, so CPU and GPU runs of one seed start from different (but equally layout-free) weights.
    """
    output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    for name, param in model.named_parameters():
        full_name = global_name(name, model)
        if tied_output_name and full_name == "output_layer.weight":
            full_name = tied_output_name
        if param.ndim == 1:
            is_norm_weight = name.endswith("weight") and "norm" in name
            param.fill_(1.0 if is_norm_weight else 0.0)
            continue
        std = output_std if full_name.endswith(_OUTPUT_PROJECTIONS) else config.init_method_std
        draw_normal(param, full_name, seed, std, gated=config.gated_linear_unit and "linear_fc1" in name)


@torch.no_grad()
def draw_normal(param: torch.Tensor, full_name: str, seed: int, std: float, gated: bool = False) -> None:
    """Fill ``param`` with this rank's shard of a normal tensor keyed on (seed, ``full_name``): the same full tensor
    under every layout, cut the way megatron-core shards it (``gated``: a gated MLP's halves sharded separately)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    sharded = getattr(param, "tensor_model_parallel", False) and tp_size > 1
    dim = getattr(param, "partition_dim", 0) if sharded else 0
    full_shape = list(param.shape)
    full_shape[dim] *= tp_size if sharded else 1
    full = initial_weight(full_name, full_shape, std, seed, param.device)
    if sharded:
        if gated:
            halves = full.chunk(2, dim=dim)
            full = torch.cat([h.chunk(tp_size, dim=dim)[tp_rank] for h in halves], dim=dim)
        else:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
    param.copy_(full.to(param.dtype))


class PostNormAdd(torch.nn.Module):
    """A layer spec's bias-dropout-add followed by a :class:`Norm`: the post-LayerNorm residual of BERT/original
    Transformer layers (``norm(x + sublayer(x))``), which megatron-core's pre-LN layers do not offer."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm = Norm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, training: bool, fused: bool):
        add = get_bias_dropout_add(training, fused)

        def add_then_norm(x_with_bias, residual, prob):
            return self.norm(add(x_with_bias, residual, prob))

        return add_then_norm


def post_ln_layer_spec(config: TransformerConfig, attn_mask_type: AttnMaskType = AttnMaskType.padding) -> ModuleSpec:
    """megatron-core's local layer with no pre-norms and a :class:`PostNormAdd` after attention and after the MLP."""
    spec = get_gpt_layer_local_spec()
    attention = with_bias_in_gemm(
        dataclasses.replace(spec.submodules.self_attention, params={"attn_mask_type": attn_mask_type}))
    bda = ModuleSpec(module=PostNormAdd, params={"config": config})
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, self_attention=attention,
        self_attn_bda=bda, mlp_bda=bda,
    )
    return dataclasses.replace(spec, submodules=submodules)


class BiasedAttention(DotProductAttention):
    """megatron-core's local core attention plus an additive ``attention_bias`` (T5's relative positions).

    megatron-core's local ``DotProductAttention`` rejects attention biases (only Transformer Engine's takes them);
    this one computes ``softmax(scale * q k^T + bias, masked)`` directly. Masks are True where attention is blocked
    and broadcast over ``[batch, heads, query, key]``; a causal mask type adds the causal triangle.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise UserError("packed sequences need Transformer Engine's attention; unset packed_seq_params")
        scores = torch.einsum("qbnh,kbnh->bnqk", query.float(), key.float()) * self.softmax_scale
        if attention_bias is not None:
            scores = scores + attention_bias.float()
        blocked = attention_mask
        if (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal:
            sq, sk = scores.shape[-2:]
            causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
            blocked = causal if blocked is None else (blocked | causal)
        if blocked is not None:
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if self.training and self.config.attention_dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        context = torch.einsum("bnqk,kbnh->qbnh", probs, value)
        return context.reshape(context.shape[0], context.shape[1], -1)


def t5_block_specs(config: TransformerConfig, encoder_layers: int, decoder_layers: int
                   ) -> tuple[TransformerBlockSubmodules, TransformerBlockSubmodules]:
    """Encoder and decoder blocks of a T5: pre-norm :class:`Norm` layers with :class:`BiasedAttention`."""
    encoder = get_gpt_layer_local_spec()
    attention = encoder.submodules.self_attention
    attention = dataclasses.replace(
        attention, params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=dataclasses.replace(attention.submodules, core_attention=BiasedAttention),
    )
    encoder = dataclasses.replace(encoder, submodules=dataclasses.replace(
        encoder.submodules, input_layernorm=Norm, pre_mlp_layernorm=Norm, self_attention=attention))
    decoder = decoder_model_with_local_spec()
    sub = decoder.submodules
    self_attention, cross_attention = (
        dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, core_attention=BiasedAttention))
        for spec in (sub.self_attention, sub.cross_attention)
    )
    decoder = dataclasses.replace(decoder, submodules=dataclasses.replace(
        sub, input_layernorm=Norm, pre_cross_attn_layernorm=Norm, pre_mlp_layernorm=Norm,
        self_attention=self_attention, cross_attention=cross_attention))
    return (TransformerBlockSubmodules(layer_specs=[encoder] * encoder_layers, layer_norm=Norm),
            TransformerBlockSubmodules(layer_specs=[decoder] * decoder_layers, layer_norm=Norm))
