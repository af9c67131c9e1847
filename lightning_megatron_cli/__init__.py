"""The ``lightning-megatron`` command: its table of subcommands, the top-level help, and the dispatch to each.

This package sits beside ``lightning_megatron`` rather than inside it because importing ``lightning_megatron``
imports Lightning and megatron-core (seconds on a small machine): ``lightning-megatron --help`` and a mistyped
command answer at once. Each subcommand is a ``main(argv)`` in the module that implements it, run under
:func:`lightning_megatron.errors.run_command` (one-line user errors, ``--debug`` for tracebacks).
"""

from __future__ import annotations

import sys
from typing import Sequence

TRAINING = ("fit", "validate", "test", "predict")
"""LightningCLI subcommands: they take a recipe (``--config recipes/gpt-tiny.yaml``) and any override."""

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning_megatron.cli:train", "train a model from a recipe; --ckpt_path last resumes the newest checkpoint"),
    "validate": ("lightning_megatron.cli:train", "one pass over the validation split (--ckpt_path for the weights)"),
    "test": ("lightning_megatron.cli:train", "one pass over the test split (--ckpt_path for the weights)"),
    "predict": ("lightning_megatron.cli:train", "run the model's predict_step over the datamodule's prompts"),
    "preprocess": ("lightning_megatron.data.preprocess:main", "tokenise a corpus into megatron-core's .bin/.idx"),
    "generate": ("lightning_megatron.generation.cli:main", "complete prompts with a trained GPT (any TP/PP layout)"),
    "serve": ("lightning_megatron.serve.cli:main", "an OpenAI-compatible HTTP server for a trained GPT"),
    "evaluate": ("lightning_megatron.generation.evaluate:main", "perplexity on text, last-word accuracy on LAMBADA"),
    "lm-eval": ("lightning_megatron.harness:main", "lm-evaluation-harness tasks on a checkpoint (needs lm-eval)"),
    "convert": ("lightning_megatron.convert.command:main", "Hugging Face <-> lightning_megatron checkpoints"),
    "checkpoint": ("lightning_megatron.checkpoint_inspect:main", "inspect a sharded checkpoint (layout, step, tensors)"),
}
"""Subcommand -> (``"module:function"`` taking the arguments, one-line description)."""


def usage() -> str:
    """The top-level help: every subcommand with one line, and where each one's options are listed."""
    width = max(map(len, COMMANDS))

    def rows(names: Sequence[str]) -> list[str]:
        return [f"  {name:<{width}}  {COMMANDS[name][1]}" for name in names]

    tools = [name for name in COMMANDS if name not in TRAINING]
    return "\n".join([
        "usage: lightning-megatron <command> [options]", "",
        "Training (a LightningCLI over a recipe: --config recipes/gpt-tiny.yaml, overrides like --trainer.devices 2):",
        *rows(TRAINING), "", "Tools:", *rows(tools), "",
        "lightning-megatron <command> --help lists a command's options. Errors print one line; --debug (or",
        "LIGHTNING_MEGATRON_DEBUG=1) adds the traceback.",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-megatron`` console script; exits with the command's status.

    With ``argv`` given (a call from Python) it raises ``SystemExit`` like any command; without (the console script)
    it owns the process, which then ends promptly, child processes included (see ``run_command``).
    """
    owns_process = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; choose one of {', '.join(COMMANDS)} "
              f"(lightning-megatron --help)", file=sys.stderr)
        sys.exit(2)
    import importlib

    from lightning_megatron.errors import run_command

    module_name, _, function = COMMANDS[args[0]][0].partition(":")
    command = getattr(importlib.import_module(module_name), function)
    training = args[0] in TRAINING
    # Training keeps Python's normal exit: loggers (W&B, ...) may finish their uploads at exit.
    run_command(command, args if training else args[1:], owns_process=owns_process, exit_at_once=not training)
