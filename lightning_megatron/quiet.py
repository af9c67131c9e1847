"""Warnings and tips from our dependencies that no user of this package can act on, silenced in one place.

Each entry says why it is noise here. Warnings a user can act on (a layout, a precision, a missing optional backend
when it matters) are left alone; optional backends are reported once by :mod:`lightning_megatron.backends`.
"""

from __future__ import annotations

import logging
import warnings

IGNORED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # megatron-core warns at import time about every optional backend it does not find.
    (r".*(Transformer Engine|Apex|apex).*", UserWarning),
    # megatron-core 0.16 deprecates the default value of its own cuda_graph_scope; we never set it.
    (r"full scope is deprecated", UserWarning),
    # Lightning's pytree helper uses a torch class that torch 2.10+ deprecates.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # Lightning ignores sync_dist under strategies that do not declare is_distributed (declaring it would make
    # Lightning replace our global-batch samplers); the losses the megatron modules log are reduced already.
    (r"It is recommended to use `self.log\('.*', \.\.\., sync_dist=True\)`", Warning),
    # megatron-core's checkpoint loading calls torch APIs that torch deprecates (DCP load_state_dict, ShardedTensor).
    (r"`load_state_dict` is deprecated and will be removed in future versions", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", Warning),
    # ... and collectives torch renames (all_gather_into_tensor, reduce_scatter_tensor, ...).
    (r"`torch\.distributed\.\w+` is deprecated", FutureWarning),
    # Lightning's packaging history: its CSV logger works; TensorBoard is used when installed.
    (r"Starting from v1.9.0, `tensorboardX` has been removed", UserWarning),
)
"""(message regex, category) of each silenced warning."""

LIGHTNING_TIPS = "💡 Tip:"
"""Lightning's advertisements for its cloud services (litlogger, litmodels), logged at INFO on every run."""


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIPS)


def silence_dependency_noise() -> None:
    """Install the filters (idempotent; before megatron-core and Lightning are imported, so import-time ones count)."""
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
