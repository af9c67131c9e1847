"""Which training steps do monitoring work (learning rate, gradient norm, throughput).

Each ``self.log`` costs Lightning about half a millisecond of Python, and a value that must be synchronised or read
back from the GPU costs more, while loggers record metrics only every ``log_every_n_steps`` steps. Monitoring values
are therefore computed and logged on the steps whose metrics reach the loggers, and on a run's first and last step
(so that they are there from the start and end as the run's final values); between those steps
``trainer.callback_metrics`` and the progress bar keep the last logged value. The loss is logged every step.
"""

from __future__ import annotations

import lightning.pytorch as pl


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether the training step in progress (``on_train_batch_start`` to ``on_train_batch_end``) logs monitoring
    metrics: Lightning hands its metrics to the loggers, or it is step 1 or ``max_steps``."""
    if trainer.fast_dev_run or trainer._logger_connector.should_update_logs:
        return True
    # Lightning counts this step once it ends (what its own logging interval uses, see should_update_logs).
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return step == 1 or step == trainer.max_steps
