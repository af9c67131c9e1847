"""User errors: one line naming the fix, a non-zero exit, and every process of the run gone within seconds.

Code that detects bad input (a layout, a batch size, a missing file, a config that does not fit the data) raises
:class:`UserError` - or a subclass such as ``LayoutError``, ``CheckpointError``, ``ConversionError`` - with a
message of the form ``<what is wrong>; <how to fix it>``, naming options as the user writes them. Every
``lightning-megatron`` command runs under :func:`run_command`, which prints such errors as one line,
``error: <what>; <fix>``, on global rank 0 only, and exits with status 1 (2 for command-line syntax). Anything else
is a bug and keeps its traceback. ``--debug`` on any command (or ``LIGHTNING_MEGATRON_DEBUG=1``) shows the
traceback of user errors too.

A failed process ends its child processes (ranks launched by Lightning, data-loader and checkpoint writers) before it
exits, so no rank outlives the failure waiting in a collective.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import traceback
from typing import Callable, NoReturn, Sequence

DEBUG_ENV = "LIGHTNING_MEGATRON_DEBUG"
"""Set to 1 to print the traceback of user errors (what ``--debug`` does)."""
GRACE_SECONDS = 3.0
"""How long an error that is probably not the first is held back: a user error on a rank other than 0 (every rank
usually hits it, and rank 0 reports it), or a rank losing its connection to a peer that failed (the peer reports
why). The first report ends the run (Lightning's launcher and torchrun stop the remaining ranks) before these print.
"""
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted")
"""Collective errors that mean another rank died: the consequence of a failure, not its cause."""


class UserError(ValueError):
    """Bad input - a configuration, a file, a command-line value; the message says what is wrong and how to fix it."""


def debug_requested(argv: list[str]) -> bool:
    """Remove ``--debug`` from ``argv`` (in place) and say whether tracebacks are wanted (flag or environment)."""
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # ranks that Lightning launches re-run the command with this environment
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is about the user's input rather than a bug (Lightning's configuration errors included)."""
    if isinstance(error, (UserError, FileNotFoundError, argparse.ArgumentError)):
        return True
    return type(error).__name__ == "MisconfigurationException"


def one_line(error: BaseException) -> str:
    """The error's message on one line (command-line parsing errors reduced to the option and the reason)."""
    text = describe_argument_error(str(error)) if isinstance(error, argparse.ArgumentError) else str(error)
    if isinstance(error, FileNotFoundError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}"  # Python's own ``[Errno 2] ...`` form
    return " ".join(text.split()) or type(error).__name__


def describe_argument_error(message: str) -> str:
    """``--trainer.devices: Expected a <class 'int'>. Got value: x; ...`` from jsonargparse's nested report."""
    top = re.match(r'Parser key "([^"]+)":', message.strip())
    nested = re.search(r"NestedArg\(key='([^']+)'", message)
    reason = argument_error_reason(message)
    if top is None:
        return f"{reason}; see --help for the accepted options"
    option = "--" + top.group(1) + (f".{nested.group(1)}" if nested else "")
    return f"{option}: {reason}; see --help for the accepted options"


def argument_error_reason(message: str) -> str:
    """The innermost reason of jsonargparse's nested report (``Expected a <class 'int'>. Got value: x``)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    top = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    skip = ("Parser key", "Problem with given class_path", "Does not validate", "Subtypes:", "Errors:", "Given value",
            "- Expected a <class 'NoneType'>", "- Expected a <class 'str'>")
    reasons = [line.lstrip("- ") for line in lines[1:] if not line.startswith(skip)]
    return reasons[-1] if reasons else (top.group(2) if top else message)


def _global_rank() -> int:
    lightning_rank = sys.modules.get("lightning.fabric.utilities.rank_zero")
    rank = getattr(getattr(lightning_rank, "rank_zero_only", None), "rank", None)
    if rank is None:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))
    return int(rank)


def end_child_processes() -> None:
    """Kill every process this one started (other ranks, data-loader workers, checkpoint writers)."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def report(error: BaseException, debug: bool) -> int:
    """Print ``error`` for the user (one line, or the traceback for bugs and ``--debug``); return the exit status."""
    user = is_user_error(error)
    rank = _global_rank()
    peer_lost = any(text in str(error) for text in PEER_LOST)
    if peer_lost or (user and rank != 0):
        time.sleep(GRACE_SECONDS)  # see GRACE_SECONDS: the first report usually ends this process meanwhile
    prefix = "error: " if rank == 0 else f"error: rank {rank}: "
    if peer_lost and not debug:
        print(f"{prefix}lost the connection to another rank, which failed ({one_line(error)[:160]}); its error is "
              f"reported above", file=sys.stderr)
    elif debug or not user:
        if rank != 0:
            print(f"rank {rank}:", file=sys.stderr)
        traceback.print_exception(error)
    if user:
        print(prefix + one_line(error), file=sys.stderr)
    return 2 if isinstance(error, argparse.ArgumentError) else 1


def run_command(main: Callable[[list[str]], int | None], argv: Sequence[str], owns_process: bool = False,
                exit_at_once: bool = False) -> NoReturn:
    """Run a command's ``main(argv)`` and exit with its status; report failures as :func:`report` does.

    ``owns_process`` (the console script, not a caller in Python): a failure also ends this process's child processes
    and exits at once, without waiting for threads or collectives that will never finish; with ``exit_at_once`` a
    success does too, skipping the interpreter's teardown of torch and megatron-core (seconds on a busy machine),
    for commands whose results are on disk and on the terminal when ``main`` returns.
    """
    args = list(argv)
    debug = debug_requested(args)
    try:
        status = main(args) or 0
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the top of the command: everything is reported
        if isinstance(error, BrokenPipeError) and _stdout_closed():
            # The reader went away (``... | head``): nothing to report, and nothing more can be printed.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status = 1
        elif isinstance(error, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            status = 130
        else:
            status = report(error, debug)
        if owns_process:
            _exit_now(status, end_children=True)
        sys.exit(status)
    if owns_process and exit_at_once:
        _exit_now(status, end_children=False)
    sys.exit(status)


def _stdout_closed() -> bool:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    return False


def _exit_now(status: int, end_children: bool) -> NoReturn:
    if _stdout_closed():
        status = status or 1  # what was printed did not all reach the reader
    sys.stderr.flush()
    if end_children:
        end_child_processes()
    os._exit(status)
