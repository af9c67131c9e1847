"""Profile training steps of Trainer(strategy="megatron") with torch.profiler; prints where the time goes.

python benchmarks/profile_step.py --preset gpt2_124m [--cuda-graphs] [--fusions] [--multi-tensor-adam]   (GPU)
Prints the step's wall time against busy GPU time (the gap is host overhead: Python, syncs, launches), the GPU
time per kind of kernel (matmuls, attention, optimizer, ...), and the top operators by device and by host time.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

import lightning_megatron as lm
from train_throughput import RandomData, all_fusions


# First match wins: a kernel's name says what it does (cuBLAS/CUTLASS matmuls, flash/cuDNN attention, ...).
KINDS = {
    "attention": ("flash", "fmha", "attention", "sdpa", "cudnn"),
    "matmul": ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk"),
    "optimizer": ("multi_tensor", "adam", "foreach"),
    "norm": ("layer_norm", "layernorm", "rms_norm"),
    "softmax / cross entropy": ("softmax", "nll", "cross_entropy", "logsumexp"),
    "copy / cast": ("copy", "memcpy", "memset", "cast", "fill"),
    "reduction": ("reduce",),
    "compiled (triton)": ("triton",),
    "elementwise": ("elementwise", "vectorized", "unrolled"),
}


NOT_KERNELS = ("ProfilerStep", "Command Buffer Full")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, marks in KINDS.items() if any(mark in name for mark in marks)), "other")


class Profile(L.Callback):
    def __init__(self, skip: int, active: int, stacks: bool = False) -> None:
        self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stacks,
                                schedule=schedule(wait=skip, warmup=1, active=active, repeat=1))
        self.walls: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.profiler.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.walls.append(time.perf_counter() - self._start)
        self.profiler.step()

    def on_train_end(self, trainer, pl_module) -> None:
        self.profiler.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt2_124m")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--cuda-graphs", action="store_true", help="MegatronStrategy(cuda_graphs=True)")
    parser.add_argument("--fusions", action="store_true", help="every megatron fusion that applies to the model")
    parser.add_argument("--multi-tensor-adam", action="store_true",
                        help="OptimConfig(fused=False) (the default is torch's fused AdamW on GPUs)")
    parser.add_argument("--stacks", action="store_true",
                        help="also list the operators with the most GPU time by the Python lines that called them")
    args = parser.parse_args()
    config = getattr(lm.GPTConfig, args.preset)(seq_length=args.seq)
    if args.fusions:
        config = all_fusions(config)
    skip, active = 6, 3
    steps = skip + 1 + active + 1
    prof = Profile(skip, active, args.stacks)
    trainer = L.Trainer(strategy=lm.MegatronStrategy(cuda_graphs=args.cuda_graphs), accelerator="gpu", devices=1,
                        precision="bf16-mixed", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[prof], limit_val_batches=0)
    data = RandomData(config.vocab_size, args.seq, args.global_batch, args.micro_batch, steps)
    trainer.fit(lm.GPT(config, lm.OptimConfig(fused=False if args.multi_tensor_adam else None)), datamodule=data)
    events = prof.profiler.key_averages()
    # The profiler's own ranges (steps, a full launch queue) carry device time too; only kernels count.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith(NOT_KERNELS)]
    device_total = sum(e.self_device_time_total for e in kernels) / active / 1e3
    wall = sorted(prof.walls[skip:])[len(prof.walls[skip:]) // 2] * 1e3
    print(f"# {torch.cuda.get_device_name()}: median step {wall:.1f} ms wall, {device_total:.1f} ms of GPU kernels "
          f"per step ({device_total / wall:.0%} busy)")
    kinds: collections.Counter[str] = collections.Counter()
    for event in kernels:
        kinds[kind_of(event.key)] += event.self_device_time_total / active / 1e3
    for kind, ms in kinds.most_common():
        print(f"{kind:<26} {ms:9.2f} ms per step  {ms / device_total:6.1%} of GPU time  {ms / wall:6.1%} of the step")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.stacks:
        print_by_caller(prof.profiler, active, args.rows)


def print_by_caller(profiler: profile, active: int, rows: int) -> None:
    """The operators with the most GPU time outside matmuls and attention, by their callers (innermost first), so
    that a copy or an add can be traced to its origin. The profiler records Python frames and autograd nodes as
    enclosing events, so an operator's callers are its ancestors."""
    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    for event in profiler.events():
        if event.self_device_time_total <= 0 or event.name in MATMULS or kind_of(event.name) in ("matmul", "attention"):
            continue
        callers, parent = [], event.cpu_parent
        while parent is not None and len(callers) < 5:
            callers.append(re.sub(r".*/(site-packages|lightning_megatron)/| object at 0x\w+", "", parent.name)[:90])
            parent = parent.cpu_parent
        totals[event.name, " <- ".join(callers)] += event.self_device_time_total / active / 1e3
    print("# by caller: GPU ms per step, operator, callers (innermost first)")
    for (name, callers), ms in totals.most_common(rows):
        print(f"{ms:8.2f}  {name[:36]:<36}  {callers}")

if __name__ == "__main__":
    main()
