"""megatron's process groups live as long as the run that made them: fitting again in one process (a notebook, a
sweep) replaces them instead of piling up gloo groups whose threads keep polling."""

import os

import lightning as L
import pytest
import torch

import lightning_megatron as lm
from lightning_megatron import parallel
from test_training_step import RandomData


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_fitting_again_in_one_process_leaves_no_groups_or_threads_behind():
    config = lm.GPTConfig.tiny(vocab_size=256, hidden_size=64, seq_length=32)
    threads = []
    for _ in range(3):
        trainer = L.Trainer(strategy=lm.MegatronStrategy(), accelerator="cpu", devices=1, max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(lm.GPT(config, lm.OptimConfig(warmup_steps=0)), datamodule=RandomData(256, 32, 4, 2, 2))
        threads.append(_threads())
    # Each fit's ~20 gloo groups hold two or three threads each; a few others may start late (a slack of 4).
    assert threads[2] <= threads[1] + 4, f"threads after each fit: {threads}"
    parallel.destroy()
    assert list(torch.distributed.distributed_c10d._world.pg_map) in ([], [torch.distributed.group.WORLD])
