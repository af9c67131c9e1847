"""Checkpoint save/load throughput and the training stall of a synchronous versus an asynchronous save.

Trains a GPT for a few steps twice in one process - once saving synchronously, once with ``async_save=True`` -
saving once mid-run, and reports: checkpoint size, save throughput (GB/s, save call to published directory), load
throughput, and the stall (extra wall time of the steps around the save over the median step) with the ratio
async/sync. Default size: ~110M parameters, ~1.3 GB of fp32 weights + Adam moments.

    python benchmarks/checkpoint_io.py                       # >= 1 GB of state, CPU or one GPU
    python benchmarks/checkpoint_io.py --smoke               # seconds, for a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import lightning_megatron as lm
from lightning_megatron.checkpoint import MegatronCheckpointIO
from lightning_megatron.data import TextDataModule


class SaveOnce(L.Callback):
    """Times every step, saves once after ``save_step``, then measures publication and reload.

    A first, untimed save after step 1 starts dist_checkpointing's helper processes in both modes alike."""

    def __init__(self, path: Path, save_step: int) -> None:
        self.path = path
        self.save_step = save_step
        self.step_times: list[float] = []
        self.save_call = self.published_after = self.load_time = 0.0
        self._start = self._saved_at = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            trainer.save_checkpoint(self.path.with_name("warmup.ckpt"))
        if trainer.global_step == self.save_step:
            self._saved_at = time.perf_counter()
            trainer.save_checkpoint(self.path)
            self.save_call = time.perf_counter() - self._saved_at
        if self._saved_at and not self.published_after and self.path.exists():
            self.published_after = time.perf_counter() - self._saved_at
        self.step_times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module):
        io = trainer.strategy.checkpoint_io
        assert isinstance(io, MegatronCheckpointIO)
        io.finalize(blocking=True)
        if not self.published_after:
            self.published_after = time.perf_counter() - self._saved_at
        start = time.perf_counter()
        trainer.strategy.load_checkpoint(self.path)
        self.load_time = time.perf_counter() - start


def run(args: argparse.Namespace, async_save: bool, directory: Path) -> dict[str, float]:
    config = lm.GPTConfig(vocab_size=4096, num_layers=args.layers, hidden_size=args.hidden,
                          num_attention_heads=args.heads, seq_length=args.seq)
    model = lm.GPT(config, lm.OptimConfig(lr=1e-4, decay_steps=args.steps))
    data = TextDataModule(seq_length=args.seq, global_batch_size=args.batch, micro_batch_size=args.batch)
    path = directory / ("async.ckpt" if async_save else "sync.ckpt")
    timer = SaveOnce(path, save_step=args.steps // 2)
    trainer = L.Trainer(
        strategy=lm.MegatronStrategy(async_save=async_save),
        accelerator=args.accelerator, devices=1, max_steps=args.steps, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=data)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    times = timer.step_times
    save_index = args.steps // 2 - 1
    baseline = statistics.median(times[1:save_index])  # not the first step, nor the warm-up save
    after = times[save_index:]
    return {
        "bytes": size,
        "save_call_s": timer.save_call,
        "published_s": timer.published_after,
        "load_s": timer.load_time,
        "step_s": baseline,
        "stall_s": sum(after) - baseline * len(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accelerator", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir, removed)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, for a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.heads, args.seq, args.steps = 2, 128, 4, 64, 10
    directory = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        results = {mode: run(args, mode == "async", directory) for mode in ("sync", "async")}
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    device = torch.cuda.get_device_name() if args.accelerator == "cuda" else platform.processor() or "cpu"
    print(f"hardware: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, checkpoints in {directory}")
    print(f"model: {args.layers} layers, hidden {args.hidden}; checkpoint {results['sync']['bytes'] / 1e9:.2f} GB")
    for mode, r in results.items():
        gb = r["bytes"] / 1e9
        print(f"{mode:>5}: save call {r['save_call_s']:.2f}s, published after {r['published_s']:.2f}s "
              f"({gb / r['published_s']:.2f} GB/s), load {r['load_s']:.2f}s ({gb / r['load_s']:.2f} GB/s), "
              f"step {r['step_s']:.2f}s, training stall {r['stall_s']:.2f}s")
    ratio = results["async"]["stall_s"] / results["sync"]["stall_s"] if results["sync"]["stall_s"] > 0 else float("nan")
    print(f"stall ratio async/sync: {ratio:.2f}")


if __name__ == "__main__":
    main()
