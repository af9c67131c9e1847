"""Where a run keeps its checkpoints, and which one ``ckpt_path="last"`` resumes from.

Lightning's default checkpointing writes into the logger's ``lightning_logs/version_N/checkpoints``, a new directory
for every run, so a second run's ``ckpt_path="last"`` looks in an empty directory and silently starts over. The
``lightning-megatron`` command instead keeps one checkpoint directory per run root (``<default_root_dir>/
checkpoints/last.ckpt``, replaced at every save, the end of training included), and resolves ``last`` to the newest complete checkpoint anywhere
under the run root - so the ``version_N`` directories of earlier runs are found too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatron.checkpoint import LAYOUT_FILE, PARTIAL_SUFFIX, read_layout

CHECKPOINT_DIR = "checkpoints"
REPLACED_SUFFIX = ".replaced"
"""A checkpoint moved aside while a newer save of the same name is published (see checkpoint.py)."""


class RunCheckpoint(ModelCheckpoint):
    """``<root>/checkpoints/last.ckpt``, replaced at every validation and when training stops between two
    (``max_steps``, ``max_time``), so that ``--ckpt_path last`` continues from the last step trained."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(dirpath=Path(root) / CHECKPOINT_DIR, filename="last", enable_version_counter=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step saved already
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def latest_checkpoint(roots: Iterable[str | os.PathLike]) -> Path | None:
    """The most recently completed megatron checkpoint under any of ``roots`` (searched recursively), or ``None``."""
    found: dict[Path, float] = {}
    for root in roots:
        if not Path(root).is_dir():
            continue
        for marker in Path(root).rglob(LAYOUT_FILE):
            path = marker.parent
            if not path.name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX)):
                found[path] = marker.stat().st_mtime
    return max(found, key=found.__getitem__) if found else None


def resolve_last(roots: Iterable[str | os.PathLike]) -> tuple[Path | None, str]:
    """``ckpt_path="last"``: the checkpoint to resume from (``None`` to start at step 0) and one line saying so."""
    given = [Path(root) for root in roots]
    full = [root.resolve() for root in given]
    # A checkpoint directory inside the run root is searched with it.
    roots = [root for root, path in zip(given, full) if not any(path != other and path.is_relative_to(other)
                                                                 for other in full)]
    path = latest_checkpoint(roots)
    where = " or ".join(str(root) for root in roots)
    if path is None:
        return None, f"--ckpt_path last: no checkpoint under {where} yet; training starts at step 0"
    return path, f"Resuming from {path} (step {read_layout(path).global_step}), the newest checkpoint under {where}"
