"""Generation speed of our engine against Hugging Face transformers' ``generate``, same shape, same device.

Measures, for our KV-cache engine (greedy, exactly N new tokens; decode steps replayed from CUDA graphs, and the
same engine decoding eagerly) and for ``GPT2LMHeadModel.generate`` (greedy, ``min_new_tokens=max_new_tokens=N``):
time to first token (prefill + one token) and decode tokens/s at each batch size, plus the fraction of the
memory-bandwidth bound the decode reaches (each decode step must read every weight and the key/value cache once:
bound = batch x bandwidth / bytes read per step; the bandwidth is measured in this script with a large device
copy). Both models have random weights of the same shape.

GPU:        python benchmarks/generate.py                                   (GPT-2 124M shape, bf16, batch 1 and 64)
            python benchmarks/generate.py --preset gpt2_1_3b --batches 1    (the 1.3B preset)
CPU smoke:  python benchmarks/generate.py --smoke                           (tiny shape, fp32, batch 1 and 4)
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


def kv_bytes(config: GPTConfig, batch: int, context: int, element_bytes: int) -> int:
    """Bytes of keys and values a decode step reads at ``context`` cached positions."""
    groups = config.num_query_groups or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_layers * batch * context * groups * head_dim * element_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, for a quick check")
    parser.add_argument("--preset", default="gpt2_124m", help="a GPTConfig preset (gpt2_124m, gpt2_1_3b, ...)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 64; smoke 1 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["graphs", "eager", "transformers"],
                        choices=["graphs", "compile", "eager", "transformers"],
                        help="compile: CUDA graphs of a torch.compile'd decode step")
    parser.add_argument("--out", help="append the results as a JSON line to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        config = GPTConfig(vocab_size=4096, num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256)
    else:
        config = getattr(GPTConfig, args.preset)()
    batches = args.batches or ([1, 64] if cuda else [1, 4])
    prompt_tokens = args.prompt_tokens or (128 if cuda else 16)
    new_tokens = args.new_tokens or (128 if cuda else 16)
    engines = [e for e in args.engines if cuda or e not in ("graphs", "compile")]
    torch.manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (max(batches), prompt_tokens))

    def bench(model: Any, tokenizer: Any) -> dict[str, Any]:
        params = sum(p.numel() for p in model.parameters())
        ours = {}
        for name in ("graphs", "compile", "eager"):
            if name not in engines:
                continue
            options = {"eager": dict(cuda_graphs=False) if cuda else {}, "graphs": {}, "compile": dict(compile=True)}
            engine = build_engine(model, None, max_batch_size=max(batches), **options[name])

            def run(size: int, tokens: int, engine=engine) -> None:
                engine.generate([row.tolist() for row in prompts[:size]], SamplingParams(max_new_tokens=tokens))

            ours[name] = run

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
        names = {"graphs": "lightning-megatron", "compile": "lightning-megatron (compiled)",
                 "eager": "lightning-megatron (eager)", "transformers": "transformers"}
        rows = []
        for size in batches:
            for engine in engines:
                result = measure(theirs if engine == "transformers" else ours[engine], size, new_tokens, device,
                                 args.repeats)
                context = prompt_tokens + new_tokens // 2
                bound = size * bandwidth / (params * element + kv_bytes(config, size, context, element))
                rows.append({"engine": names[engine], "batch": size, "params": params, **result,
                             "bandwidth_bound_fraction": result["decode_tokens_per_s"] / bound})
        del hf
        return {"rows": rows, "bandwidth_gb_s": bandwidth / 1e9}

    results = run_with_model(config, bench, tokenizer=None, accelerator="gpu" if cuda else "cpu",
                             precision="bf16-mixed" if cuda else "32-true")
    if results is None:
        return
    hardware = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                 f"{torch.get_num_threads()} threads)"
    params = results["rows"][0]["params"]
    print(f"Generation benchmark on {hardware}; model {config.num_layers}L/{config.hidden_size}H ({params / 1e6:.0f}M "
          f"parameters), {prompt_tokens} prompt + {new_tokens} new tokens, measured bandwidth "
          f"{results['bandwidth_gb_s']:.1f} GB/s")
    print(f"{'engine':<30}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>15}{'of BW bound':>13}")
    for row in results["rows"]:
        print(f"{row['engine']:<30}{row['batch']:>6}{row['ttft_ms']:>10.1f}{row['decode_tokens_per_s']:>15.1f}"
              f"{row['bandwidth_bound_fraction']:>13.1%}")
    by_key = {(r["engine"], r["batch"]): r for r in results["rows"]}
    for size in batches:
        theirs = by_key.get(("transformers", size))
        for name in ("lightning-megatron", "lightning-megatron (compiled)", "lightning-megatron (eager)"):
            ours = by_key.get((name, size))
            if ours and theirs:
                print(f"batch {size}: {name} / transformers: decode {ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x, "
                      f"TTFT {ours['ttft_ms'] / theirs['ttft_ms']:.2f}x")
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps({"benchmark": "generate", "hardware": hardware, "preset": args.preset,
                                     "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                                     "date": time.strftime("%Y-%m-%d"), **results}) + "\n")


if __name__ == "__main__":
    main()
