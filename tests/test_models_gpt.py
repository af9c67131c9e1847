"""GPT presets describe the published shapes and produce valid megatron configs; bad settings fail clearly."""

import pytest
import torch
import torch.nn.functional as F

from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.models.layers import gelu_tanh, gpt_layer_spec


def parameters(c: GPTConfig) -> int:
    """Weights of a GPT of this config (no padding), counted from the architecture."""
    h, ffn, kv = c.hidden_size, c.ffn_hidden_size or 4 * c.hidden_size, c.num_query_groups or c.num_attention_heads
    head = h // c.num_attention_heads
    attention = h * (h + 2 * kv * head) + h * h
    mlp = (3 if c.activation == "swiglu" else 2) * h * ffn
    norms = 2 * h
    embeddings = c.vocab_size * h * (1 if c.tie_embeddings else 2)
    return embeddings + c.num_layers * (attention + mlp + norms) + h


@pytest.mark.parametrize("preset, billions", [("llama_3_8b", 8.03), ("llama_3_2_1b", 1.24), ("llama_2_7b", 6.74)])
def test_llama_presets_have_the_published_sizes(preset, billions):
    assert parameters(getattr(GPTConfig, preset)()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_presets_map_to_megatron_fields():
    llama = GPT(GPTConfig.llama_3_8b()).transformer_config()
    assert (llama.num_query_groups, llama.gated_linear_unit, llama.activation_func) == (8, True, F.silu)
    assert llama.normalization == "RMSNorm" and not llama.add_bias_linear
    mqa = GPT(GPTConfig.mqa_tiny(vocab_size=256)).transformer_config()
    assert mqa.num_query_groups == 1
    gpt2 = GPT(GPTConfig.gpt2_124m()).transformer_config()
    assert gpt2.activation_func is gelu_tanh and gpt2.num_query_groups == gpt2.num_attention_heads


@pytest.mark.parametrize("build, fused", [
    (lambda: GPT(GPTConfig.tiny(vocab_size=256)), False),                                       # erf GeLU
    (lambda: GPT(GPTConfig.gpt2_124m(vocab_size=256, num_layers=2)), True),                          # tanh GeLU
    (lambda: GPT(GPTConfig.gpt2_124m(vocab_size=256, num_layers=2, add_bias_linear=False)), False),  # nothing to fuse
    (lambda: GPT(GPTConfig.llama_tiny(vocab_size=256)), True),                                  # SwiGLU
])
def test_gpu_fusions_never_change_the_activation(build, fused):
    # megatron's fused bias+GeLU is the tanh approximation, so erf GeLU never takes it, and no activation makes the
    # config invalid.
    config = build().transformer_config(bias_activation_fusion=True, bias_dropout_fusion=True)
    assert config.bias_activation_fusion is fused and config.bias_dropout_fusion


def test_fused_bias_gelu_is_the_tanh_gelu_of_unfused_runs():
    # A gelu_tanh model asking for the fusion hands megatron F.gelu, which megatron computes with its fused
    # bias + tanh-GeLU kernel: that function, and its gradient, must be gelu_tanh's.
    from megatron.core.fusions.fused_bias_gelu import bias_gelu, bias_gelu_back

    config = GPT(GPTConfig.gpt2_124m(vocab_size=256, num_layers=2)).transformer_config(bias_activation_fusion=True)
    assert config.activation_func is F.gelu and config.bias_activation_fusion
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64)
    want = gelu_tanh(x + bias)
    (grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(bias_gelu(bias, x), want)
    torch.testing.assert_close(bias_gelu_back(torch.ones_like(x), bias, x.detach()), grad)


def test_fusion_switches_reach_megatron_on_gpus_and_cpu_runs_never_fuse():
    from lightning_megatron.models.config import FUSIONS
    from lightning_megatron.parallel import ParallelConfig, RecomputeConfig
    from lightning_megatron.precision import MegatronPrecision
    from lightning_megatron.strategy import transformer_fields

    def fields(device):
        return transformer_fields(ParallelConfig(), MegatronPrecision("bf16-mixed"), RecomputeConfig(),
                                  torch.device(device))

    llama = GPT(GPTConfig.llama_tiny(vocab_size=256))
    default = llama.transformer_config(**fields("cuda"))  # off by default: they cost more than they save (measured)
    assert not (default.bias_activation_fusion or default.bias_dropout_fusion or default.cross_entropy_loss_fusion)
    fused = GPT(GPTConfig.llama_tiny(vocab_size=256, bias_activation_fusion=True, bias_dropout_fusion=True,
                                     cross_entropy_loss_fusion=True))
    gpu = fused.transformer_config(**fields("cuda"))
    assert gpu.bias_activation_fusion and gpu.bias_dropout_fusion and gpu.cross_entropy_loss_fusion
    assert gpu.cross_entropy_fusion_impl == "native" and not gpu.apply_rope_fusion  # fused RoPE needs TE
    llama = fused
    cpu = llama.transformer_config(**fields("cpu"))
    assert not any(getattr(cpu, name) for name in FUSIONS)


def test_bert_and_t5_never_fuse_their_activation():
    from lightning_megatron.models.bert import Bert, BertConfig
    from lightning_megatron.models.t5 import T5, T5Config

    for model in (Bert(BertConfig.tiny(vocab_size=256)), T5(T5Config.tiny(vocab_size=256)),
                  T5(T5Config.tiny(vocab_size=256, activation="gated-gelu"))):
        assert model.transformer_config(bias_activation_fusion=True).bias_activation_fusion is False


def test_unsupported_settings_name_the_accepted_ones():
    with pytest.raises(ValueError, match="position_embedding_type='alibbi' is not supported; accepted: "
                                         "'learned_absolute', 'rope', 'alibi'"):
        GPTConfig(vocab_size=256, position_embedding_type="alibbi")
    with pytest.raises(ValueError, match="normalization='BatchNorm' is not supported"):
        GPTConfig(vocab_size=256, normalization="BatchNorm")
    with pytest.raises(ValueError, match="ALiBi needs attention='sdpa'"):
        gpt_layer_spec(attention="local", alibi=True)


@pytest.mark.parametrize("dtype, compiled", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_our_cross_entropy_is_megatrons(dtype, compiled, one_rank):
    # GPU runs with cross_entropy_loss_fusion and one TP rank compute the loss with token_cross_entropy, compiled:
    # losses and logit gradients must be megatron's, labels outside the vocabulary included.
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from lightning_megatron.models.layers import compiled_token_cross_entropy, token_cross_entropy

    logits = (torch.randn(7, 3, 50, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, 50, (7, 3))
    labels[0, 0], labels[1, 2] = -100, 50
    ours_in, theirs_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = (compiled_token_cross_entropy if compiled else token_cross_entropy)(ours_in, labels)
    theirs = vocab_parallel_cross_entropy(theirs_in.float(), labels)
    torch.testing.assert_close(ours, theirs)
    weights = torch.rand(7, 3)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad)


@pytest.mark.parametrize("fuse_wgrad", [False, True])
def test_qkv_bias_in_gemm_is_megatrons_linear(fuse_wgrad, one_rank):
    # The attention's QKV projection adds its bias inside the GEMM: outputs and every gradient (straight into
    # main_grad when the weight-gradient accumulation is fused) must be megatron's ColumnParallelLinear's.
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lightning_megatron.backends import fuse_wgrad_accumulation
    from lightning_megatron.models.layers import BiasInGemmColumnParallelLinear

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                               gradient_accumulation_fusion=fuse_wgrad and fuse_wgrad_accumulation())
    layers = [cls(16, 48, config=config, init_method=torch.nn.init.normal_, bias=True, gather_output=False)
              for cls in (BiasInGemmColumnParallelLinear, ColumnParallelLinear)]
    torch.nn.init.normal_(layers[0].bias)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(5, 3, 16)
    grad = torch.randn(5, 3, 48)
    results = []
    for layer in layers:
        for param in layer.parameters():
            param.main_grad = torch.zeros_like(param)
        inputs = x.clone().requires_grad_()
        output, bias = layer(inputs)
        assert bias is None
        output.backward(grad)
        weight_grad = layer.weight.main_grad if config.gradient_accumulation_fusion else layer.weight.grad
        results.append((output, inputs.grad, weight_grad, layer.bias.grad))
    assert config.gradient_accumulation_fusion == fuse_wgrad and results[0][2].abs().sum() > 0
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


def test_gpt_attention_adds_the_qkv_bias_in_the_gemm():
    from lightning_megatron.models.layers import BiasInGemmColumnParallelLinear

    spec = gpt_layer_spec()
    assert spec.submodules.self_attention.submodules.linear_qkv is BiasInGemmColumnParallelLinear


def test_layer_norm_fusion_builds_our_norms_with_torchs_state_and_math_off_gpus(one_rank):
    from lightning_megatron.models.layer_norm import FusedLayerNorm

    def build(fused: bool) -> torch.nn.Module:
        model = GPT(GPTConfig.gpt2_124m(vocab_size=256, num_layers=2, hidden_size=64, num_attention_heads=4,
                                        seq_length=16, layer_norm_fusion=fused))
        return model.build_stage(model.transformer_config(), pre_process=True, post_process=True, vp_stage=None)

    fused, plain = build(True), build(False)
    norms = {name for name, module in fused.named_modules() if isinstance(module, FusedLayerNorm)}
    assert norms == {"decoder.final_layernorm", *(f"decoder.layers.{i}.{norm}" for i in range(2)
                                                  for norm in ("input_layernorm", "pre_mlp_layernorm"))}
    assert not any(isinstance(module, FusedLayerNorm) for module in plain.modules())
    state = plain.state_dict()
    assert fused.state_dict().keys() == state.keys()
    for name, tensor in fused.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            torch.testing.assert_close(tensor, state[name], msg=name)
    tokens = torch.randint(0, 256, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(tokens, positions, None), plain(tokens, positions, None))
