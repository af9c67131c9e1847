"""The ``lightning-megatron`` command: a LightningCLI (``fit``, ``validate``, ``test``, ``predict``) plus tools.

Training subcommands take a recipe (``--config recipes/gpt-tiny.yaml``) and any override
(``--trainer.strategy.tensor_model_parallel_size 2``). Tools (preprocessing, conversion, generation, serving, ...)
are separate subcommands listed in :data:`TOOLS`, each a ``main(argv)`` in the module that implements it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from lightning.pytorch.cli import LightningCLI

import lightning_megatron  # noqa: F401  (registers the "megatron" strategy)

TOOLS: dict[str, str] = {
    "preprocess": "lightning_megatron.data.preprocess:main",
    "generate": "lightning_megatron.generation.cli:main",
    "serve": "lightning_megatron.serve.cli:main",
    "evaluate": "lightning_megatron.generation.evaluate:main",
    "lm-eval": "lightning_megatron.harness:main",
    "convert": "lightning_megatron.convert.command:main",
    "checkpoint": "lightning_megatron.checkpoint_inspect:main",
}
"""Tool subcommands: name -> ``"module:function"``; the function takes the remaining arguments."""


class MegatronCLI(LightningCLI):
    """LightningCLI whose optimizers come from the module's ``configure_optimizers`` (megatron builds them)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)


def _tool(name: str) -> Callable[[Sequence[str]], int | None]:
    module_name, _, function = TOOLS[name].partition(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-megatron`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        sys.exit(_tool(argv[0])(argv[1:]) or 0)
    MegatronCLI(args=argv, subclass_mode_model=True, subclass_mode_data=True)


if __name__ == "__main__":
    main()
