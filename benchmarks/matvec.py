"""One-row matrix products (batch-1 decode): our Triton matrix-vector kernel against cuBLAS, same weights, same GPU.

For each weight shape of the GPT-2 124M and 1.3B presets, 24 distinct weights (like 24 layers, so that they are
read from device memory rather than L2) are multiplied by one row in turn, inside a CUDA graph (no launch overhead).
Prints, per shape: time per product for ``F.linear`` (cuBLAS) and ``generation.gemv`` in bf16, the kernel's time for
int8 weights with row scales, and the compiled dequantize-then-matmul that int8 used before; read rates in TB/s,
the ratio cuBLAS / ours, the largest difference from ``F.linear``, and the autotuned configuration.

GPU only:   python benchmarks/matvec.py [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lightning_megatron.generation import gemv as G

SHAPES = {"1.3B qkv": (6144, 2048), "1.3B proj": (2048, 2048), "1.3B fc1": (8192, 2048), "1.3B fc2": (2048, 8192),
          "1.3B output": (50304, 2048), "124M qkv": (2304, 768), "124M proj": (768, 768), "124M fc1": (3072, 768),
          "124M fc2": (768, 3072)}
LAYERS = 24


def graph_time(fn, reps: int = 4) -> float:
    """Microseconds per call of ``fn``, replayed ``reps`` times from one CUDA graph (best of five replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    return best


def median_ms(call: Callable[[], object], repeats: int = 30) -> float:
    """Median milliseconds of ``call`` (each timed alone, between synchronisations), after five warm-up calls."""
    times = []
    for _ in range(repeats + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    steady = sorted(times[5:])
    return steady[len(steady) // 2]


def kernel_benchmark_args(doc: str, script: str) -> argparse.Namespace:
    """The command line of the GPU kernel benchmarks (``--out``), leaving with a clear message where there is no GPU."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="append one JSON line per shape to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"benchmarks/{script} measures CUDA kernels: run it on a GPU")
    return args


def megatron_on_one_gpu(port: int) -> str:
    """A one-rank NCCL group and megatron's parallel state (TP=PP=1), for the kernel benchmarks that call megatron's
    layers; returns the hardware they print and record."""
    import torch.distributed as dist

    from lightning_megatron.parallel import ParallelConfig, initialize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    initialize(ParallelConfig(), seed=0)
    return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"


def append_row(out: str | None, row: dict) -> None:
    """Append ``row`` to the JSON-lines file ``out`` (if one was given)."""
    if out:
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    args = kernel_benchmark_args(__doc__, "matvec.py")
    device, dtype = "cuda", torch.bfloat16
    hardware = torch.cuda.get_device_name()
    dequantize = torch.compile(lambda x, w, s: (x @ w.to(x.dtype).t()) * s)
    print(f"One-row products on {hardware}, {LAYERS} distinct weights per shape, bf16 activations")
    print(f"{'shape':<14}{'N x K':>14}{'cuBLAS us':>11}{'ours us':>9}{'ratio':>7}{'int8 us':>9}{'int8 before us':>16}")
    for name, (n, k) in SHAPES.items():
        count = 2 if "output" in name else LAYERS
        weights = [torch.randn(n, k, dtype=dtype, device=device) / k**0.5 for _ in range(count)]
        quantized = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device) for _ in range(count)]
        scales = [torch.rand(n, dtype=dtype, device=device) / 100 for _ in range(count)]
        x = torch.randn(1, 1, k, dtype=dtype, device=device)
        error = (G.gemv(x, weights[0]).float() - F.linear(x, weights[0]).float()).abs().max().item()
        began = time.perf_counter()
        G.gemv(x, quantized[0], scales[0])
        row = {"shape": name, "n": n, "k": k, "max_abs_diff": error, "autotune_s": time.perf_counter() - began,
               "cublas_us": graph_time(lambda: [F.linear(x, w) for w in weights]) / count,
               "ours_us": graph_time(lambda: [G.gemv(x, w) for w in weights]) / count,
               "ours_int8_us": graph_time(lambda: [G.gemv(x, q, s) for q, s in zip(quantized, scales)]) / count,
               "dequantize_matmul_int8_us": graph_time(
                   lambda: [dequantize(x, q, s) for q, s in zip(quantized, scales)]) / count}
        row.update(cublas_tb_s=n * k * 2 / row["cublas_us"] / 1e6, ours_tb_s=n * k * 2 / row["ours_us"] / 1e6,
                   ratio=row["cublas_us"] / row["ours_us"], config=str(G._matvec.best_config), hardware=hardware,
                   date=time.strftime("%Y-%m-%d"))
        print(f"{name:<14}{f'{n} x {k}':>14}{row['cublas_us']:>11.2f}{row['ours_us']:>9.2f}{row['ratio']:>6.2f}x"
              f"{row['ours_int8_us']:>9.2f}{row['dequantize_matmul_int8_us']:>16.2f}", flush=True)
        append_row(args.out, row)


if __name__ == "__main__":
    main()
