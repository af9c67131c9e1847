"""Callbacks the CLI tests add to a recipe (``--trainer.callbacks+=cli_callbacks.FailOnRank``): a failure on one
rank at a given step, and a report of each rank's CPU threads."""

import json
import os
import time
from pathlib import Path

import lightning as L
import torch


class FailOnRank(L.Callback):
    """Raise on global rank ``rank`` when step ``step`` starts, after writing the time to ``<marker>``."""

    def __init__(self, marker: str, rank: int = 1, step: int = 2) -> None:
        self.marker, self.rank, self.step = marker, rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            Path(self.marker).write_text(str(time.time()))
            raise RuntimeError(f"a bug on rank {self.rank} at step {self.step}")


class ReportThreads(L.Callback):
    """Write ``{"threads": torch's intra-op threads, "omp": OMP_NUM_THREADS}`` to ``<directory>/rank<N>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        report = {"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
