"""Where a large model's batch-1 decode step goes, per way of running it, in one process (GPU).

Loads one preset (default: the 1.3B) once and, for each variant, decodes 128 tokens after a 128-token prompt:
decode tokens/s (as benchmarks/generate.py measures it), the replay time of the captured decode graph alone (the
step without the engine's host work between steps), and the kernels that take the most device time per token.

  graphs          CUDA graphs of the eager decode step (the default engine)
  compile         CUDA graphs of the torch.compile'd step (``compile=True``; cuBLAS matrix-vector products)
  compile-tuned   the same with inductor's coordinate-descent tuning (Triton matrix-vector reductions)
  int8-compile    int8 weights, compiled (tuned: the engine's choice for int8)

    python benchmarks/decode_variants.py --out decode_variants.jsonl [--preset gpt2_1_3b] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from generate import linear_weight_bytes, measure, measured_bandwidth
from lightning_megatron.generation import SamplingParams, build_engine, quantize_weights
from lightning_megatron.generation.session import run_with_model
from lightning_megatron.models.gpt import GPTConfig

VARIANTS = ("graphs", "compile", "compile-tuned", "int8-compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2_1_3b")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="int8 quantizes in place: keep it last")
    parser.add_argument("--top", type=int, default=16, help="kernels listed per variant")
    parser.add_argument("--out", help="append one JSON line per variant here")
    args = parser.parse_args()
    config = getattr(GPTConfig, args.preset)()
    torch.manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (128,)).tolist()

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def bench(model: Any, tokenizer: Any) -> None:
        device = torch.device("cuda")
        bandwidth = measured_bandwidth(device, 1024)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        emit({"preset": args.preset, "hardware": torch.cuda.get_device_name(), "bandwidth_gb_s": bandwidth / 1e9,
              "param_bytes": weights, "linear_weight_bytes": linear_weight_bytes(model)})
        for name in args.variants:
            started = time.time()
            try:
                torch._inductor.config.coordinate_descent_tuning = name == "compile-tuned"
                if name.startswith("int8"):
                    quantize_weights(model, "int8")
                engine = build_engine(model, None, max_batch_size=1, compile="compile" in name)

                def run(size: int, tokens: int) -> None:
                    engine.generate([prompt], SamplingParams(max_new_tokens=tokens))

                run(1, 129)  # capture and compile every shape the measurement uses
                speed = measure(run, 1, 128, device, repeats=3)
                graph, _ = engine.runner.graphs.graphs[("decode", 1, engine.runner.graphs.length(256))]
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(200):
                    graph.replay()
                torch.cuda.synchronize()
                replay_us = (time.perf_counter() - start) / 200 * 1e6
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run(1, 33)
                    torch.cuda.synchronize()
                kernels = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                                 key=lambda e: -e.self_device_time_total)
                emit({"variant": name, **speed, "graph_replay_us": replay_us,
                      "device_us_per_token": sum(e.self_device_time_total for e in kernels) / 32,
                      "bound_fraction": speed["decode_tokens_per_s"] * weights / bandwidth,
                      "setup_s": time.time() - started,
                      "top": [(round(e.self_device_time_total / 32), e.count, e.key[:90]) for e in kernels[: args.top]]})
            except Exception as error:  # one failing variant must not lose the others
                emit({"variant": name, "error": repr(error)[:400]})

    run_with_model(config, bench, accelerator="gpu", precision="bf16-mixed")


if __name__ == "__main__":
    main()
