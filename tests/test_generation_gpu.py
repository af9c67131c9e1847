"""Decoding from CUDA graphs (with lookahead) gives what the eager decode step gives (runs only where a GPU is present)."""

import pytest
import torch

from generation_helpers import ensure_parallel_state, tiny_gpt
from lightning_megatron.generation import SamplingParams, build_engine, quantize_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

PROMPTS = [[5, 17, 300, 42, 7], [9], [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 11], [3, 4]]


@pytest.fixture(scope="module")
def models():
    import torch.distributed as dist

    from generation_helpers import _free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    ensure_parallel_state()
    built = {}
    for arch in ("gpt2", "llama", "alibi"):
        model = tiny_gpt(arch, seq_length=256)
        model.chunks.cuda()
        built[arch] = model
    return built


def run(model, prompts, params, graphs, max_batch_size=4, **options):
    ensure_parallel_state()
    engine = build_engine(model, None, max_batch_size=max_batch_size, cuda_graphs=graphs, **options)
    outputs = engine.generate(prompts, params)
    return outputs, engine


@pytest.mark.parametrize("arch", ["gpt2", "llama", "alibi"])
def test_graphed_greedy_decoding_equals_eager(models, arch):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=True)
    eager, _ = run(models[arch], PROMPTS, params, graphs=False, lookahead=False)
    graphed, engine = run(models[arch], PROMPTS, params, graphs=True)  # with lookahead, the default on CUDA
    captured = {kind for kind, _, _ in engine.runner.graphs.graphs}
    assert engine.runner.graphs.failed is None and captured == {"prefill", "decode"}, captured
    assert [o.tokens for o in graphed] == [o.tokens for o in eager]
    assert len({t for o in eager for t in o.tokens}) > 8, "degenerate model: the comparison would prove little"
    for a, b in zip(graphed, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def test_graphed_continuous_batching_and_sampling_equal_eager(models):
    # Two slots for four requests: requests join and leave between graphed steps; batch buckets change.
    mixed = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 30, 12, 20)]
    mixed[1] = mixed[1].replace(temperature=0.9, top_k=50, top_p=0.9, seed=3)
    mixed[3] = mixed[3].replace(repetition_penalty=1.3, presence_penalty=0.5)
    eager, _ = run(models["gpt2"], PROMPTS, mixed, graphs=False, max_batch_size=2, lookahead=False)
    graphed, engine = run(models["gpt2"], PROMPTS, mixed, graphs=True, max_batch_size=2)
    assert len(engine.runner.graphs.graphs) >= 2
    assert [o.tokens for o in graphed] == [o.tokens for o in eager]
    beams = SamplingParams(max_new_tokens=10, beam_width=3, ignore_eos=True)
    assert [o.tokens for o in run(models["llama"], PROMPTS[:2], beams, graphs=True, max_batch_size=6)[0]] == \
        [o.tokens for o in run(models["llama"], PROMPTS[:2], beams, graphs=False, max_batch_size=6)[0]]


def test_compiled_graphed_decoding_equals_eager(models):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    eager, _ = run(models["llama"], PROMPTS, params, graphs=False)
    compiled, engine = run(models["llama"], PROMPTS, params, graphs=True, compile=True)
    assert engine.runner.graphs.failed is None
    assert [o.tokens for o in compiled] == [o.tokens for o in eager]


@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled"])
def test_int8_graphed_decoding_equals_eager(models, compile):
    ensure_parallel_state()
    model = tiny_gpt("llama", seq_length=256)
    model.chunks.cuda()
    quantize_weights(model, "int8")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    eager, _ = run(model, PROMPTS, params, graphs=False)
    graphed, engine = run(model, PROMPTS, params, graphs=True, compile=compile)
    kernel = model.chunks[0].decoder.layers[0].mlp.linear_fc1.int8_kernel
    assert engine.runner.graphs.failed is None, (kernel, engine.runner.graphs.failed)
    assert [o.tokens for o in graphed] == [o.tokens for o in eager], kernel


@pytest.mark.parametrize("shape", [(6144, 2048), (2048, 8192), (768, 768), (50304, 768), (3, 384)])
def test_matvec_kernel_equals_torch(shape):
    from lightning_megatron.generation.gemv import gemv

    n, k = shape
    torch.manual_seed(0)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    expected = x.float() @ weight.float().t()
    assert gemv(x, weight).shape == (1, 1, n)
    torch.testing.assert_close(gemv(x, weight).float(), expected, atol=2e-2, rtol=2e-2)
    quantized = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = (torch.rand(n, device="cuda") / 100).to(torch.bfloat16)
    expected = x.float() @ (quantized.float() * scale.float()[:, None]).t()
    torch.testing.assert_close(gemv(x, quantized, scale).float(), expected, atol=2e-2, rtol=2e-2)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(gemv(x, quantized, scale, bias).float(), expected + bias.float(), atol=2e-2, rtol=2e-2)


def test_decoding_through_the_matvec_kernel_equals_torch_matmuls(models, monkeypatch):
    import lightning_megatron.generation.runner as runner

    params = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=True)
    kernel, engine = run(models["gpt2"], PROMPTS[:1], params, graphs=True, max_batch_size=1)
    assert engine.runner._linears, "no layer went through the kernel"
    monkeypatch.setattr(runner, "usable", lambda x, weight: False)
    torch_matmul, _ = run(models["gpt2"], PROMPTS[:1], params, graphs=True, max_batch_size=1)
    assert kernel[0].tokens == torch_matmul[0].tokens
    assert kernel[0].logprobs == pytest.approx(torch_matmul[0].logprobs, abs=1e-3)


def _reference_attention(q, k, v, cache_keys, cache_values, valid, position, kv_length, slopes, cell_positions):
    """The decode step's attention in torch: the new key/value written at ``position``, masked softmax over the cache."""
    from lightning_megatron.models.attention import alibi_bias

    cache_keys, cache_values = cache_keys.clone(), cache_values.clone()
    cache_keys[:, :, position], cache_values[:, :, position] = k[0], v[0]
    per_group = q.shape[2] // k.shape[2]
    keys = cache_keys[:, :, :kv_length].repeat_interleave(per_group, 1).float()
    values = cache_values[:, :, :kv_length].repeat_interleave(per_group, 1).float()
    scores = torch.einsum("bhd,bhkd->bhk", q[0].float(), keys) / q.shape[-1] ** 0.5
    if slopes is not None:
        scores += alibi_bias(slopes, cell_positions[:, position : position + 1], cell_positions[:, :kv_length])[:, :, 0]
    allowed = valid[:, :kv_length].clone()
    allowed[:, position] = True
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), values)
    return out.reshape(1, q.shape[1], -1), cache_keys, cache_values


@pytest.mark.parametrize("batch, heads, groups, dim, cells, kv_length, position, splits, alibi, dtype", [
    (1, 16, 16, 128, 256, 256, 200, None, False, torch.bfloat16),  # the 1.3B preset's shape, splits for the GPU
    (1, 4, 4, 64, 200, 130, 129, 1, False, torch.float32),
    (2, 4, 2, 32, 200, 190, 150, 4, False, torch.float32),  # grouped-query, a span past kv_length
    (3, 2, 1, 64, 300, 256, 200, 2, True, torch.bfloat16),  # ALiBi, multi-query
    (64, 12, 12, 64, 256, 256, 255, None, False, torch.bfloat16),  # the 124M preset at batch 64
])
def test_decode_attention_kernel_equals_torch(batch, heads, groups, dim, cells, kv_length, position, splits, alibi,
                                              dtype):
    from lightning_megatron.generation.decode_attention import attend_and_write

    torch.manual_seed(0)
    # Query, key and value are views of one fused projection, as megatron's attention hands them over.
    qkv = torch.randn(1, batch, heads + 2 * groups, dim, dtype=dtype, device="cuda")
    q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + groups], qkv[:, :, heads + groups :]
    cache_keys = torch.randn(batch, groups, cells, dim, dtype=dtype, device="cuda")
    cache_values = torch.randn_like(cache_keys)
    valid = torch.rand(batch, cells, device="cuda") > 0.3
    slopes = torch.rand(heads, device="cuda") if alibi else None
    cell_positions = torch.randint(0, 100, (batch, cells), device="cuda") if alibi else None
    expected, expected_keys, expected_values = _reference_attention(
        q, k, v, cache_keys, cache_values, valid, position, kv_length, slopes, cell_positions)
    counters = torch.zeros(batch * heads, dtype=torch.int32, device="cuda")
    originals = cache_keys.clone(), cache_values.clone()
    for _ in range(3):  # the split counters must come back to zero for the next launch
        cache_keys.copy_(originals[0]), cache_values.copy_(originals[1])
        out = attend_and_write(q, k, v, cache_keys, cache_values, valid, torch.tensor([position], device="cuda"),
                               kv_length, dim**-0.5, slopes, cell_positions, split_count=splits, counters=counters)
        assert not counters.any()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    assert torch.equal(cache_keys, expected_keys) and torch.equal(cache_values, expected_values)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "alibi"])
def test_decoding_through_the_attention_kernel_equals_sdpa(models, arch, monkeypatch):
    import lightning_megatron.generation.runner as runner

    # Four prompts of different lengths in two slots: rows join late, so their valid cells differ.
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True)
    kernel, engine = run(models[arch], PROMPTS, params, graphs=True, max_batch_size=2)
    assert engine.runner._decode_kernel and engine.runner.graphs.failed is None
    monkeypatch.setattr(runner.decode_attention, "usable", lambda device, head_dims: False)
    sdpa, engine = run(models[arch], PROMPTS, params, graphs=True, max_batch_size=2)
    assert not engine.runner._decode_kernel
    assert [o.tokens for o in kernel] == [o.tokens for o in sdpa]
    for a, b in zip(kernel, sdpa):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
