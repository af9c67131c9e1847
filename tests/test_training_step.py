"""A training step reads nothing back from the device: loss, gradient norm and the empty-batch check stay tensors
until a logger or the progress bar reads them (on a GPU every read-back would make the host wait for the step)."""

import collections
import sys
import traceback

import lightning as L
import pytest
import torch

import lightning_megatron as lm
from launch import REPO
from lightning_megatron.callbacks import MegatronProgressBar

sys.path.insert(0, str(REPO / "benchmarks"))
from train_throughput import RandomData  # noqa: E402

READ_BACKS = ("item", "tolist", "__float__", "__int__", "__bool__")


class ReadBacks(L.Callback):
    """Counts tensor read-backs (``.item()``, ``float(t)``, ...) made by lightning_megatron or megatron-core from the
    start of step ``first`` to the start of the last step, by the line that made them. The data pipeline's tensors
    are host tensors (reading them waits for no device), and CPU emulation's re-dispatch of a call is that call."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.sites: collections.Counter = collections.Counter()
        self.steps = 0
        self._counting = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in READ_BACKS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, read_back):
        def counted(tensor, *args, **kwargs):
            if self._counting:
                caller = traceback.extract_stack(limit=2)[0]
                path = caller.filename.rsplit("site-packages/", 1)[-1]
                if "megatron/" in path and not path.endswith("lightning_megatron/cpu.py") and "/data/" not in path:
                    self.sites[f"{path}:{caller.lineno} {caller.name}"] += 1
            return read_back(tensor, *args, **kwargs)

        return counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx > self.first:
            self.steps += 1
        self._counting = self.first <= batch_idx < trainer.max_steps - 1


def test_training_steps_read_nothing_back(monkeypatch):
    steps = 8
    config = lm.GPTConfig.tiny(vocab_size=256, hidden_size=64, seq_length=32)
    counter = ReadBacks(first=3)
    counter.install(monkeypatch)
    trainer = L.Trainer(strategy=lm.MegatronStrategy(), accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[counter])
    trainer.fit(lm.GPT(config, lm.OptimConfig(warmup_steps=0)), datamodule=RandomData(256, 32, 4, 2, steps))
    assert counter.steps == steps - 1 - 3
    assert not counter.sites, f"read-backs in {counter.steps} steps: {counter.sites.most_common()}"
    # The step's results are still there to read: the logged loss and gradient norm.
    assert torch.isfinite(trainer.callback_metrics["train_loss"]) and trainer.callback_metrics["grad_norm"] > 0


def test_the_progress_bar_reads_the_loss_back_on_logging_steps_only(monkeypatch):
    steps = 10
    config = lm.GPTConfig.tiny(vocab_size=256, hidden_size=64, seq_length=32)
    counter = ReadBacks(first=2)
    counter.install(monkeypatch)
    bar = MegatronProgressBar()
    trainer = L.Trainer(strategy=lm.MegatronStrategy(), accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=3, callbacks=[counter, bar])
    trainer.fit(lm.GPT(config, lm.OptimConfig(warmup_steps=0)), datamodule=RandomData(256, 32, 4, 2, steps))
    # Steps 3-9 are counted (batch_idx 2-8); the logging steps among them are 3, 6 and 9 (where the strategy's
    # empty-batch check reads its flag back too).
    reads = sum(count for site, count in counter.sites.items() if "callbacks/progress.py" in site)
    assert reads == 3, counter.sites.most_common()
    assert bar.train_progress_bar.postfix and "train_loss=" in bar.train_progress_bar.postfix
