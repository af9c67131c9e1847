"""Generation speed of our engine against Hugging Face transformers' ``generate``, same shape, same device.

Measures, for our KV-cache engine (greedy, exactly N new tokens) and for ``GPT2LMHeadModel.generate`` (greedy,
``min_new_tokens=max_new_tokens=N``): time to first token (prefill + one token, batch 1) and decode tokens/s at
batch 1 and at a large batch, plus the fraction of the memory-bandwidth bound the decode reaches (each decode step
must read every weight and the key/value cache once: bound = batch x bandwidth / bytes read per step; the bandwidth
is measured in this script with a large device copy). Both models have random weights of the GPT-2 shape.

GPU:        python benchmarks/generate.py                  (GPT-2 124M shape, bf16, batch 1 and 64)
CPU smoke:  python benchmarks/generate.py --smoke          (tiny shape, fp32, batch 1 and 4)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch

from lightning_megatron.generation import SamplingParams, build_engine
from lightning_megatron.generation.session import run_with_model
from lightning_megatron.models.gpt import GPTConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measured_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a large on-device copy (read + write), the practical memory-bandwidth ceiling."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _timed(lambda: target.copy_(source), device, repeats=5)
    return 2 * source.numel() * 4 / seconds


def measure(generate_n: Callable[[int, int], None], batch: int, new_tokens: int, device: torch.device,
            repeats: int) -> dict[str, float]:
    """Time to first token and decode tokens/s of ``generate_n(batch, tokens)``."""
    first = _timed(lambda: generate_n(batch, 1), device, repeats)
    whole = _timed(lambda: generate_n(batch, new_tokens), device, repeats)
    return {"ttft_ms": first * 1e3, "decode_tokens_per_s": batch * (new_tokens - 1) / (whole - first)}


def bytes_per_step(config: GPTConfig, batch: int, context: int, element_bytes: int) -> int:
    """Weights plus the key/value cache read by one decode step."""
    h, layers = config.hidden_size, config.num_layers
    params = config.padded_vocab_size() * h + layers * (12 * h * h + 13 * h) + config.seq_length * h
    return (params + 2 * layers * batch * context * h) * element_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, for a quick check")
    parser.add_argument("--batch", type=int, default=None, help="the large batch (default 64 GPU, 4 smoke)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="append the results as a JSON line to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        config = GPTConfig(vocab_size=4096, num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256)
    else:
        config = GPTConfig.gpt2_124m()
    batch = args.batch or (64 if cuda else 4)
    prompt_tokens = args.prompt_tokens or (128 if cuda else 16)
    new_tokens = args.new_tokens or (128 if cuda else 16)
    torch.manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_tokens))

    def bench(model: Any, tokenizer: Any) -> dict[str, Any]:
        engine = build_engine(model, None, max_batch_size=batch)

        def ours(size: int, tokens: int) -> None:
            params = SamplingParams(max_new_tokens=tokens)
            engine.generate([row.tolist() for row in prompts[:size]], params)

        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.seq_length,
                                        n_embd=config.hidden_size, n_layer=config.num_layers,
                                        n_head=config.num_attention_heads)).to(device, dtype).eval()

        def theirs(size: int, tokens: int) -> None:
            with torch.no_grad():
                hf.generate(prompts[:size].to(device), attention_mask=torch.ones_like(prompts[:size]).to(device),
                            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

        bandwidth = measured_bandwidth(device, 1024 if cuda else 256)
        element = torch.finfo(dtype).bits // 8
        rows = []
        for size in (1, batch):
            for name, fn in (("lightning-megatron", ours), ("transformers", theirs)):
                result = measure(fn, size, new_tokens, device, args.repeats)
                context = prompt_tokens + new_tokens // 2
                bound = size * bandwidth / bytes_per_step(config, size, context, element)
                rows.append({"engine": name, "batch": size, **result,
                             "bandwidth_bound_fraction": result["decode_tokens_per_s"] / bound})
        return {"rows": rows, "bandwidth_gb_s": bandwidth / 1e9}

    results = run_with_model(config, bench, tokenizer=None, accelerator="gpu" if cuda else "cpu",
                             precision="bf16-mixed" if cuda else "32-true")
    if results is None:
        return
    hardware = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                 f"{torch.get_num_threads()} threads)"
    print(f"Generation benchmark on {hardware}; model {config.num_layers}L/{config.hidden_size}H, "
          f"{prompt_tokens} prompt + {new_tokens} new tokens, measured bandwidth {results['bandwidth_gb_s']:.1f} GB/s")
    print(f"{'engine':<20}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>15}{'of BW bound':>13}")
    for row in results["rows"]:
        print(f"{row['engine']:<20}{row['batch']:>6}{row['ttft_ms']:>10.1f}{row['decode_tokens_per_s']:>15.1f}"
              f"{row['bandwidth_bound_fraction']:>13.1%}")
    by_key = {(r["engine"], r["batch"]): r for r in results["rows"]}
    for size in (1, batch):
        ours, theirs = by_key[("lightning-megatron", size)], by_key[("transformers", size)]
        print(f"batch {size}: decode speed ratio ours/transformers = "
              f"{ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}, TTFT ratio = "
              f"{ours['ttft_ms'] / theirs['ttft_ms']:.2f}")
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps({"benchmark": "generate", "hardware": hardware, **results}) + "\n")


if __name__ == "__main__":
    main()
