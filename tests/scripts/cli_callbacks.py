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


class RecordOutputs(L.Callback):
    """After training, write what the trained GPT computes in its own layout: ``<directory>/logits.pt``
    ({"tokens": [8, 16], "logits": [8, 16, vocab]}, by the last rank) and ``<directory>/greedy.json``
    (the greedy continuation of ``prompt``, by rank 0)."""

    def __init__(self, directory: str, prompt: str = "In the beginning", new_tokens: int = 12) -> None:
        self.directory, self.prompt, self.new_tokens = directory, prompt, new_tokens

    def on_train_end(self, trainer, pl_module):
        from lightning_megatron.generation import SamplingParams, generate

        tokenizer = trainer.datamodule.tokenizer
        ids = tokenizer.encode("In the beginning God created the heaven and the earth. And the earth was without "
                               "form, and void; and darkness was upon the face of the deep.")
        tokens = torch.tensor([ids[i: i + 16] for i in range(8)])  # two microbatches: what VP needs
        pl_module.collected_logits = []
        trainer.strategy.run_step(pl_module, {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones_like(
            tokens, dtype=torch.float)}, forward_only=True)
        if trainer.global_rank == trainer.world_size - 1:  # on the last pipeline stage in every layout
            logits = torch.cat(pl_module.collected_logits)
            torch.save({"tokens": tokens, "logits": logits}, Path(self.directory, "logits.pt"))
        pl_module.collected_logits = None
        output = generate(pl_module, self.prompt, SamplingParams(max_new_tokens=self.new_tokens), tokenizer=tokenizer)
        if trainer.global_rank == 0:
            Path(self.directory, "greedy.json").write_text(json.dumps({"tokens": output[0].tokens,
                                                                       "text": output[0].text}))
