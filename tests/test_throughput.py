"""The Throughput callback's figures: tokens per second of training, with validation's time left out."""

import lightning as L
import pytest

import lightning_megatron as lm
from lightning_megatron.callbacks import Throughput
from lightning_megatron.callbacks import throughput as throughput_module
from test_training_step import RandomData


class WithValidation(RandomData):
    def val_dataloader(self):
        return self.train_dataloader()


class Clock(L.Callback):
    """A fake ``perf_counter``: each training batch takes 1 s, each validation batch 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, *args) -> None:
        self.now += 1.0

    def on_validation_batch_start(self, *args) -> None:
        self.now += 100.0


@pytest.mark.parametrize("validate", [False, True], ids=["no-validation", "validation-every-2-steps"])
def test_tokens_per_second_count_training_time_only(monkeypatch, validate):
    clock = Clock()
    monkeypatch.setattr(throughput_module.time, "perf_counter", clock)
    config = lm.GPTConfig.tiny(vocab_size=256, hidden_size=64, seq_length=32)
    trainer = L.Trainer(strategy=lm.MegatronStrategy(), accelerator="cpu", devices=1, max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=3, num_sanity_val_steps=0, val_check_interval=2 if validate else None,
                        limit_val_batches=2 if validate else 0, callbacks=[clock, Throughput()])
    trainer.fit(lm.GPT(config, lm.OptimConfig(warmup_steps=0)), datamodule=WithValidation(256, 32, 4, 2, 6))
    assert clock.now == 6 + (300 * 2 if validate else 0)  # validation ran after steps 2, 4 and 6
    # Steps 4-6 (the last logging interval): 3 steps of 4 x 32 tokens in 3 s of training.
    assert float(trainer.callback_metrics["tokens_per_s"]) == pytest.approx(4 * 32)
