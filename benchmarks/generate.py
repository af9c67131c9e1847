"""Generation speed of our engine against Hugging Face transformers' ``generate``, same shape, same device.

Measures, for our KV-cache engine (greedy, exactly N new tokens; decode steps replayed from CUDA graphs, and the
same engine decoding eagerly) and for ``GPT2LMHeadModel.generate`` (greedy, ``min_new_tokens=max_new_tokens=N``):
time to first token (prefill + one token) and decode tokens/s at each batch size, plus the fraction of the
memory-bandwidth bound the decode reaches (each decode step must read every weight and the key/value cache once:
bound = batch x bandwidth / bytes read per step; the bandwidth is measured in this script with a large device
copy). Both models have random weights of the same shape. The ``int8`` engines run after the others on the same
model with its linear weights quantized to int8 (weight-only, per-output-channel scales); the script prints the
bytes of the linear weights before and after, and which int8 matmul the device ran.

GPU:        python benchmarks/generate.py                                   (GPT-2 124M shape, bf16, batch 1 and 64)
            python benchmarks/generate.py --preset gpt2_1_3b --batches 1    (the 1.3B preset)
            python benchmarks/generate.py --batches 1 --engines graphs int8 int8-compile   (int8 against bf16)
            python benchmarks/generate.py --engines graphs graphs-sync transformers     (lookahead on and off)
            python benchmarks/generate.py --engines compile compile-torch transformers  (our Triton kernels on/off)
CPU smoke:  python benchmarks/generate.py --smoke                           (tiny shape, fp32, batch 1 and 4)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from lightning_megatron.generation import SamplingParams, build_engine, quantize_weights
from lightning_megatron.generation.session import run_with_model
from lightning_megatron.models.gpt import GPTConfig
from lightning_megatron.parallel import unwrap


NAMES = {"graphs": "lightning-megatron", "compile": "lightning-megatron (compiled)",
         "eager": "lightning-megatron (eager)", "transformers": "transformers", "int8": "lightning-megatron int8",
         "int8-compile": "lightning-megatron int8 (compiled)", "graphs-sync": "lightning-megatron (no lookahead)",
         "compile-sync": "lightning-megatron (compiled, no lookahead)",
         "compile-torch": "lightning-megatron (compiled, torch kernels)"}


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


def linear_layers(model: Any) -> list[torch.nn.Module]:
    """The model's tensor-parallel linear layers that hold a weight of their own (not a tied output layer)."""
    return [layer for chunk in model.chunks for layer in unwrap(chunk).modules()
            if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) and layer.weight is not None
            and not getattr(layer.weight, "shared_embedding", False)]


def linear_weight_bytes(model: Any) -> int:
    """Bytes of the linear layers' weights, with the scales of int8 ones."""
    tensors = [t for layer in linear_layers(model) for t in (layer.weight, getattr(layer, "weight_scale", None))
               if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, for a quick check")
    parser.add_argument("--preset", default="gpt2_124m", help="a GPTConfig preset (gpt2_124m, gpt2_1_3b, ...)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 64; smoke 1 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["graphs", "eager", "transformers"],
                        choices=list(NAMES),
                        help="compile: CUDA graphs of a torch.compile'd decode step; int8: the graphs engine with "
                             "int8 weights (int8-compile: compiled), measured after the others; -sync: the same "
                             "engine reading each step's tokens back before launching the next (no lookahead)")
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
    engines = [e for e in args.engines if cuda or not e.startswith(("graphs", "compile", "int8-compile"))]
    engines.sort(key=lambda e: e.startswith("int8"))  # quantizing is in place: the float engines go first
    torch.manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (max(batches), prompt_tokens))

    def bench(model: Any, tokenizer: Any) -> dict[str, Any]:
        params = sum(p.numel() for p in model.parameters())
        element = torch.finfo(dtype).bits // 8
        memory = {"linear_weight_bytes": linear_weight_bytes(model)}
        options = {"eager": dict(cuda_graphs=False) if cuda else {}, "graphs": {}, "compile": dict(compile=True),
                   "int8": {}, "int8-compile": dict(compile=True), "graphs-sync": dict(lookahead=False),
                   "compile-sync": dict(compile=True, lookahead=False),
                   "compile-torch": dict(compile=True, kernels=False)}

        def ours(name: str) -> Callable[[int, int], None]:
            if name.startswith("int8") and "int8_kernel" not in memory:
                allocated = torch.cuda.memory_allocated(device) if cuda else 0
                quantize_weights(model, "int8")
                memory["int8_linear_weight_bytes"] = linear_weight_bytes(model)
                memory["int8_kernel"] = linear_layers(model)[0].int8_kernel
                if cuda:
                    memory["quantize_freed_bytes"] = allocated - torch.cuda.memory_allocated(device)
            engine = build_engine(model, None, max_batch_size=max(batches), **options[name])

            def run(size: int, tokens: int) -> None:
                engine.generate([row.tolist() for row in prompts[:size]], SamplingParams(max_new_tokens=tokens))

            return run

        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.seq_length,
                                        n_embd=config.hidden_size, n_layer=config.num_layers,
                                        n_head=config.num_attention_heads)).to(device, dtype).eval()

        def theirs(size: int, tokens: int) -> None:
            with torch.no_grad():
                hf.generate(prompts[:size].to(device), attention_mask=torch.ones_like(prompts[:size]).to(device),
                            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

        bandwidth = measured_bandwidth(device, 1024 if cuda else 256)
        rows = []
        for engine in engines:
            generate_n = theirs if engine == "transformers" else ours(engine)
            weights = params * element
            if engine.startswith("int8"):
                weights += memory["int8_linear_weight_bytes"] - memory["linear_weight_bytes"]
            for size in batches:
                result = measure(generate_n, size, new_tokens, device, args.repeats)
                context = prompt_tokens + new_tokens // 2
                bound = size * bandwidth / (weights + kv_bytes(config, size, context, element))
                rows.append({"engine": NAMES[engine], "batch": size, "params": params, **result,
                             "bandwidth_bound_fraction": result["decode_tokens_per_s"] / bound})
        return {"rows": rows, "bandwidth_gb_s": bandwidth / 1e9, **memory}

    dtype_name = str(dtype).removeprefix("torch.")
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
        for name in ("lightning-megatron", "lightning-megatron (compiled)", "lightning-megatron (eager)",
                     NAMES["graphs-sync"], NAMES["compile-sync"], NAMES["compile-torch"]):
            ours = by_key.get((name, size))
            if ours and theirs:
                print(f"batch {size}: {name} / transformers: decode {ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x, "
                      f"TTFT {ours['ttft_ms'] / theirs['ttft_ms']:.2f}x")
    if "int8_linear_weight_bytes" in results:
        before, after = results["linear_weight_bytes"], results["int8_linear_weight_bytes"]
        print(f"int8 ({results['int8_kernel']}): linear weights {before / 2**20:.1f} MiB ({dtype_name}) -> "
              f"{after / 2**20:.1f} MiB (int8 + scales), {after / before:.2f}x")
        if "quantize_freed_bytes" in results:
            print(f"device memory freed by quantizing: {results['quantize_freed_bytes'] / 2**20:.1f} MiB")
        for size in batches:
            for int8, float_engine in (("int8", "graphs" if cuda else "eager"), ("int8-compile", "compile")):
                quantized, unquantized = by_key.get((NAMES[int8], size)), by_key.get((NAMES[float_engine], size))
                if quantized and unquantized:
                    print(f"batch {size}: {NAMES[int8]} / {NAMES[float_engine]}: decode "
                          f"{quantized['decode_tokens_per_s'] / unquantized['decode_tokens_per_s']:.2f}x")
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps({"benchmark": "generate", "hardware": hardware, "preset": args.preset,
                                     "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                                     "date": time.strftime("%Y-%m-%d"), **results}) + "\n")


if __name__ == "__main__":
    main()
