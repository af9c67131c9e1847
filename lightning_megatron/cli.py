"""The training subcommands of ``lightning-megatron`` (``fit``, ``validate``, ``test``, ``predict``): a LightningCLI.

They take a recipe (``--config recipes/gpt-tiny.yaml``) and any override
(``--trainer.strategy.tensor_model_parallel_size 2``). Unless the recipe configures its own ``ModelCheckpoint``, a
run checkpoints into ``<default_root_dir>/checkpoints/last.ckpt``, and ``--ckpt_path last`` resumes from the newest
checkpoint under ``default_root_dir`` (see :mod:`lightning_megatron.resume`). The command table, the top-level help
and the tools live in :mod:`lightning_megatron_cli`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import lightning_megatron  # noqa: F401  (registers the "megatron" strategy)
from lightning_megatron.errors import UserError
from lightning_megatron.resume import RunCheckpoint, resolve_last

# We hand LightningCLI the arguments ourselves (``--debug`` taken out); its note about sys.argv is not for users.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


class MegatronCLI(LightningCLI):
    """LightningCLI whose optimizers come from the module's ``configure_optimizers`` (megatron builds them), whose
    runs keep one checkpoint directory, and whose configuration errors are :class:`UserError`\\ s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # errors reach lightning_megatron.errors
        self._checkpointing: ModelCheckpoint | None = None
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Build the model, data and Trainer; a value they reject is the configuration's fault, named as such."""
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as error:
            if isinstance(error, UserError):
                raise
            raise UserError(f"{error} (check the recipe and --trainer/--model/--data options)") from error

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, checkpointing into ``<default_root_dir>/checkpoints`` unless the recipe says otherwise."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(callback, ModelCheckpoint) for callback in (*callbacks, *extra)
        ):
            self._checkpointing = RunCheckpoint(config.get("default_root_dir") or ".")
            kwargs["callbacks"] = [*callbacks, self._checkpointing]
            # The directory is meant to be reused; before_fit says when a new run will replace a checkpoint.
            warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(self._checkpointing.dirpath)}")
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """``--ckpt_path last``: the newest checkpoint under the run's root (and any checkpoint directory)."""
        arguments = self.config_init[self.subcommand]
        if arguments.get("ckpt_path") != "last":
            previous = Path(self._checkpointing.dirpath) / "last.ckpt" if self._checkpointing else None
            if arguments.get("ckpt_path") is None and previous is not None and previous.is_dir():
                rank_zero_info(f"{previous}, an earlier run's checkpoint, will be replaced at this run's first save; "
                               f"--ckpt_path last resumes it instead")
            return
        roots = [self.trainer.default_root_dir]
        roots += [c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        path, message = resolve_last(list(dict.fromkeys(roots)))
        rank_zero_info(message)
        arguments["ckpt_path"] = None if path is None else str(path)


def train(argv: Sequence[str]) -> None:
    """Run a training subcommand (``fit``, ``validate``, ``test``, ``predict``) with its arguments."""
    MegatronCLI(args=list(argv), subclass_mode_model=True, subclass_mode_data=True)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lightning-megatron`` command (also ``python -m lightning_megatron``); see :mod:`lightning_megatron_cli`."""
    from lightning_megatron_cli import main as command

    command(argv)


if __name__ == "__main__":
    main()
