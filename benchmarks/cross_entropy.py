"""The language-model loss, forward and backward: our compiled cross entropy against megatron-core's two.

For each shape of ``[sequence, batch, vocabulary]`` bf16 logits, times forward + backward of
``layers.compiled_token_cross_entropy`` (what GPT uses with ``cross_entropy_loss_fusion`` on one TP rank), megatron's
native fused ``fused_vocab_parallel_cross_entropy`` and its unfused ``vocab_parallel_cross_entropy``, and prints
milliseconds per call, each one's ratio to ours, and the bytes of bf16 logits read per millisecond.

GPU only:   python benchmarks/cross_entropy.py [--out rows.jsonl]
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from lightning_megatron.models.layers import compiled_token_cross_entropy
from matvec import append_row, kernel_benchmark_args, megatron_on_one_gpu

# GPT-2 124M at micro batch 8 and the 1.3B preset at micro batch 16, sequence 1024, GPT-2's padded vocabulary.
SHAPES = {"124M mb8": (1024, 8, 50304), "1.3B mb16": (1024, 16, 50304)}
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ours (compiled token_cross_entropy)": compiled_token_cross_entropy,
    "megatron native fused": lambda logits, labels: fused_vocab_parallel_cross_entropy(
        logits, labels, dist.group.WORLD),
    "megatron unfused": vocab_parallel_cross_entropy,
}


def time_call(loss: Callable, logits: torch.Tensor, labels: torch.Tensor, repeats: int = 20) -> float:
    """Median milliseconds of one forward + backward from a fresh copy of the logits (megatron's work in place)."""
    times = []
    for _ in range(repeats + 3):
        leaf = logits.clone().requires_grad_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss(leaf, labels).sum().backward()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    steady = sorted(times[3:])
    return steady[len(steady) // 2]


def main() -> None:
    args = kernel_benchmark_args(__doc__, "cross_entropy.py")
    hardware = megatron_on_one_gpu(29534)
    print(f"Cross entropy forward + backward on {hardware}, bf16 logits, milliseconds per call")
    for name, (seq, batch, vocab) in SHAPES.items():
        logits = torch.randn(seq, batch, vocab, device="cuda", dtype=torch.bfloat16) * 4
        labels = torch.randint(0, vocab, (seq, batch), device="cuda")
        times = {label: time_call(loss, logits, labels) for label, loss in LOSSES.items()}
        ours = times["ours (compiled token_cross_entropy)"]
        gigabytes = logits.numel() * logits.element_size() / 1e9
        for label, ms in times.items():
            print(f"{name:<10} {label:<38} {ms:8.3f} ms  {ms / ours:5.2f}x ours  {gigabytes / ms:6.2f} GB of logits/ms")
        append_row(args.out, {"shape": name, "logits": [seq, batch, vocab], "hardware": hardware, "ms": times})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
