"""Layouts across several GPUs of one host: loss parity with one GPU, tokens/s, MFU, memory, scaling efficiency.

Driver (one command on a multi-GPU box; NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is set for the children):
    python benchmarks/multi_gpu.py --preset gpt2_350m
Each layout runs as its own ``torchrun`` job of this same file (``--worker``) on the same global batch, so its loss
after N steps must equal the 1-GPU run's within bf16 tolerance. Weak scaling: tokens/s per GPU of a data-parallel run
over tokens/s of the 1-GPU run. CPU smoke (gloo, tiny model): ``python benchmarks/multi_gpu.py --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "1 device": dict(devices=1),
    "DP": dict(devices="all"),
    "DP + distributed optimizer": dict(devices="all", use_distributed_optimizer=True),
    "TP=2": dict(devices=2, tensor_model_parallel_size=2),
    "PP=2, VP=2": dict(devices=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    "TP=2 x PP=2 x DP": dict(devices="all", tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
}


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    import lightning_megatron as lm
    from train_throughput import RandomData, StepTimer, median_step

    layout = json.loads(args.layout)
    cuda = args.device == "cuda"
    config = getattr(lm.GPTConfig, args.preset)(seq_length=args.seq) if cuda else lm.GPTConfig.tiny(
        vocab_size=4096, seq_length=args.seq, hidden_size=64)
    timer = StepTimer()
    record: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.append(float(trainer.callback_metrics["train_loss"]))

    trainer = L.Trainer(
        strategy=lm.MegatronStrategy(**{k: v for k, v in layout.items() if k != "devices"}),
        accelerator="gpu" if cuda else "cpu", devices=args.devices, precision="bf16-mixed" if cuda else "32-true",
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer, Losses()], limit_val_batches=0,
    )
    trainer.fit(lm.GPT(config, lm.OptimConfig(lr=1e-4, warmup_steps=0, decay_steps=args.steps)),
                datamodule=RandomData(config.vocab_size, args.seq, args.global_batch, args.micro_batch, args.steps))
    if trainer.is_global_zero:
        step = median_step(timer.times, min(3, args.steps - 1))
        result = {"losses": record, "step_s": step, "tokens_per_s": args.global_batch * args.seq / step,
                  "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  "world_size": trainer.world_size}
        Path(args.out).write_text(json.dumps(result))


def drive(args: argparse.Namespace) -> None:
    import torch

    cuda = args.device == "cuda"
    available = torch.cuda.device_count() if cuda else args.cpu_processes
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for name, layout in LAYOUTS.items():
        devices = available if layout["devices"] == "all" else layout["devices"]
        model_parallel = layout.get("tensor_model_parallel_size", 1) * layout.get("pipeline_model_parallel_size", 1)
        if devices > available or devices % model_parallel or (layout["devices"] == "all" and devices < 2):
            print(f"skip {name}: needs more devices than the {available} here", flush=True)
            continue
        out = Path(tempfile.mkdtemp()) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices), __file__,
                   "--worker", "--layout", json.dumps(layout), "--devices", str(devices), "--out", str(out),
                   *forwarded(args)]
        subprocess.run(command, check=True, env=env)
        results[name] = json.loads(out.read_text())
    base = results["1 device"]
    for name, result in results.items():
        loss_gap = abs(result["losses"][-1] - base["losses"][-1])
        scaling = result["tokens_per_s"] / result["world_size"] / base["tokens_per_s"]
        row = {"layout": name, "world_size": result["world_size"], "final_loss": result["losses"][-1],
               "loss_gap_vs_1_device": loss_gap, "tokens_per_s": result["tokens_per_s"],
               "per_device_scaling_efficiency": scaling, "peak_mem_gb": result["peak_mem_gb"],
               "hardware": torch.cuda.get_device_name() if cuda else "CPU (gloo)"}
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--preset", args.preset, "--steps", str(args.steps), "--seq", str(args.seq),
            "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch)]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default="gpt2_350m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cpu-processes", type=int, default=2)
    parser.add_argument("--results", default="benchmarks/results/multi_gpu.jsonl")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq = args.seq or (1024 if args.device == "cuda" else 64)
    if args.worker:
        worker(args)
    else:
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        drive(args)


if __name__ == "__main__":
    main()
