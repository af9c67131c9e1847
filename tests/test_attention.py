"""SDPAttention (our core attention) computes what megatron-core's own local attention computes."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.models.attention import SDPAttention, context_parallel_positions
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
