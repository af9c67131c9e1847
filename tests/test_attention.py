"""SDPAttention (our core attention) computes what megatron-core's own local attention computes, and with ALiBi adds
BLOOM's linear bias."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.models.attention import SDPAttention, alibi_slopes, context_parallel_positions
from lightning_megatron.parallel import ParallelConfig, destroy, initialize


@pytest.fixture
def single_process():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with CPUEmulation():
        initialize(ParallelConfig(), seed=0)
        yield
        destroy()


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_sdpa_matches_megatron_local_attention(single_process, groups, mask):
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups,
                               attention_dropout=0.0, masked_softmax_fusion=False)
    mask_type = AttnMaskType.causal if mask == "causal" else AttnMaskType.padding
    ours = SDPAttention(config, 1, mask_type, "self")
    theirs = DotProductAttention(config, 1, mask_type, "self")
    torch.manual_seed(0)
    s, b, d = 12, 3, 16
    q = torch.randn(s, b, 4, d, requires_grad=True)
    k = torch.randn(s, b, groups, d, requires_grad=True)
    v = torch.randn(s, b, groups, d, requires_grad=True)
    attention_mask = None
    if mask == "padding":
        lengths = torch.tensor([12, 7, 3])
        pad = torch.arange(s)[None, :] >= lengths[:, None]
        attention_mask = (pad[:, None, None, :] | pad[:, None, :, None])
        attention_mask = attention_mask & ~torch.eye(s, dtype=torch.bool)  # keep every row non-empty
    outputs, grads = [], []
    for module in (ours, theirs):
        out = module(q, k, v, attention_mask)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for ours_grad, theirs_grad in zip(*grads):
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-5)


def test_context_parallel_chunks_cover_the_sequence_once():
    cp, local = 4, 6
    positions = torch.cat([context_parallel_positions(local, cp, r, torch.device("cpu")) for r in range(cp)])
    assert sorted(positions.tolist()) == list(range(cp * local))
    # Rank r holds chunk r and its mirror, which balances causal work.
    assert context_parallel_positions(local, cp, 0, torch.device("cpu")).tolist() == [0, 1, 2, 21, 22, 23]


@pytest.mark.parametrize("heads", [1, 3, 4, 6, 12, 16, 20, 112])
def test_alibi_slopes_are_bloom_slopes(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    reference = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)[:, 0, 1]  # slope x key position 1
    torch.testing.assert_close(alibi_slopes(heads), reference)


@pytest.mark.parametrize("groups", [6, 2])
@pytest.mark.parametrize("padding", [False, True])
def test_sdpa_with_alibi_adds_the_linear_bias_causally(single_process, groups, padding):
    heads, s, b, d = 6, 10, 2, 8
    config = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads,
                               num_query_groups=groups, attention_dropout=0.0)
    ours = SDPAttention(config, 1, AttnMaskType.causal, "self", alibi=True)
    torch.manual_seed(0)
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    blocked = torch.zeros(b, 1, s, s, dtype=torch.bool)
    if padding:  # the second sequence's first 3 keys are padding (its queries still see themselves)
        blocked[1, :, :, :3] = True
        blocked[1, :, torch.arange(3), torch.arange(3)] = False
    out = ours(q, k, v, blocked if padding else None)
    # The bias written out by hand: softmax(q.k / sqrt(d) - slope_h * (i - j)) over j <= i.
    k_, v_ = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k_) / d**0.5
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    scores = scores - alibi_slopes(heads)[:, None, None] * (i - j)
    scores = scores.masked_fill((j > i) | blocked, float("-inf"))
    expected = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v_).reshape(s, b, heads * d)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
