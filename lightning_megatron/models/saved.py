"""The module a checkpoint saved, rebuilt from what :func:`~lightning_megatron.checkpoint.read_saved_module` read:
the class ``layout.json`` names (for a ``.ckpt`` file, the one whose config has the saved fields), built with the
saved config and LoRA settings, without a recipe."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from lightning_megatron.checkpoint import CheckpointError, SavedModule
from lightning_megatron.models.bert import Bert, BertConfig
from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.models.lora import LoRAConfig
from lightning_megatron.models.t5 import T5, T5Config
from lightning_megatron.module import MegatronModule

MODULES: dict[str, tuple[type[MegatronModule], type]] = {"GPT": (GPT, GPTConfig), "Bert": (Bert, BertConfig),
                                                         "T5": (T5, T5Config)}
"""The modules a checkpoint can be rebuilt from, by their class name, with their config classes."""


def module_from_saved(saved: SavedModule) -> MegatronModule:
    """An unbuilt module of the class, config and LoRA adapters ``saved`` records (``init_from``: the base model of an
    adapters-only checkpoint); one saved without a config is an error asking for the training recipe."""
    config = saved.init_args.get("config")
    name = saved.module or _class_of(config)
    if not isinstance(config, dict) or name not in MODULES:
        raise CheckpointError(f"{saved.weights} (a {name or 'module of unrecorded class'}) carries no model config "
                              f"to rebuild it from; pass --config <the training recipe>")
    module_class, config_class = MODULES[name]
    return module_class(config_class(**config), lora=LoRAConfig(**saved.lora) if saved.lora else None,
                        init_from=saved.base)


def _class_of(config: Any) -> str | None:
    """The module class of a config saved without its class name: the only one whose config has every saved field
    (each has fields of its own: GPT ``attention``, BERT ``binary_head``, T5 ``decoder_seq_length``)."""
    if not isinstance(config, dict):
        return None
    fitting = [name for name, (_, config_class) in MODULES.items()
               if set(config) <= {field.name for field in fields(config_class)}]
    return fitting[0] if len(fitting) == 1 else None


__all__ = ["MODULES", "module_from_saved"]
