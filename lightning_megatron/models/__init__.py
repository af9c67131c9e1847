"""LightningModules over megatron-core models.

``GPT`` and ``GPTConfig`` are imported from :mod:`.gpt` on first use, so that the modules the models build on
(``module``, ``checkpoint``) can import ``models.lora`` and ``models.layers`` without importing the models.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GPT", "GPTConfig"]


def __getattr__(name: str) -> Any:
    """``GPT`` or ``GPTConfig`` (``from lightning_megatron.models import GPT``)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from lightning_megatron.models import gpt

    return getattr(gpt, name)
