"""Several runs of a test script in the same launched processes, each computing what it would alone in a fresh launch.

A launch pays interpreter start-up, the imports of torch, megatron-core and Lightning, and the process group's
set-up; scripts that take ``--then`` (``train_gpt.py --out a.json --tp 2 --then --out b.json --pp 2``) pay it once
for all their runs.
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Callable

import numpy
import torch

from lightning_megatron import checkpoint, parallel


class FreshState:
    """What a run may change in its process, as it was when the process started; :meth:`restore` puts it back."""

    def __init__(self) -> None:
        self.environ = dict(os.environ)
        self.rng = (torch.get_rng_state(), random.getstate(), numpy.random.get_state())
        self.publish = checkpoint._publish  # train_gpt.py's --kill-at-save replaces it

    def restore(self) -> None:
        parallel.destroy()  # megatron's groups, which the last run kept for saving after fit
        os.environ.clear()
        os.environ.update(self.environ)
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        numpy.random.set_state(self.rng[2])
        checkpoint._publish = self.publish
        torch._dynamo.reset()  # layers an earlier run compiled


def layout_arguments() -> argparse.ArgumentParser:
    """A parser with the options every run has: ``--out`` (its JSON results), ``--devices`` and the layout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    return parser


def split_runs(argv: list[str]) -> list[list[str]]:
    """The command line cut at each ``--then`` into the arguments of each run."""
    cuts = [-1] + [i for i, arg in enumerate(argv) if arg == "--then"] + [len(argv)]
    return [argv[start + 1:end] for start, end in zip(cuts, cuts[1:])]


def run_each(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None], argv: list[str]) -> None:
    """Call ``run`` with the parsed arguments of each run of ``argv`` in turn, each from the state the process had
    when this was called; then end the process groups."""
    fresh = FreshState()
    for args in split_runs(argv):
        fresh.restore()
        run(parser.parse_args(args))
    # Gloo's worker threads, left running into the interpreter's exit, now and then abort it ("terminate called
    # without an active exception") after every run has succeeded.
    parallel.destroy()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
