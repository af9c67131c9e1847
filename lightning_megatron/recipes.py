"""The model and tokenizer of a training recipe, read as ``fit`` reads them: the one reader behind ``--config`` of
``generate``, ``serve``, ``evaluate`` and ``convert megatron-to-hf`` (``--adapter-only`` included).

A recipe is a LightningCLI YAML file (``recipes/gpt-tiny.yaml``). Its ``model`` section (``class_path``,
``init_args``) is instantiated by jsonargparse with ``fit``'s types and checks, so a recipe that trains is a recipe
that loads, and one that would not train fails here in one line; the module stays unbuilt (no chunks, nothing loaded
from ``init_from``). Its ``data`` section is instantiated only for the tokenizer the datamodule trains with. Other
sections (``trainer``, ``seed_everything``) are not read.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import yaml

from lightning_megatron.errors import UserError, argument_error_reason
from lightning_megatron.module import MegatronModule

_EXAMPLE = "recipes/gpt-tiny.yaml"


@dataclass(frozen=True)
class Recipe:
    """What a training recipe says of its model: the module and the tokenizer its datamodule trains with."""

    module: MegatronModule
    """The recipe's module (``GPT``, ``Bert``, ``T5``...) with its config, LoRA and ``init_from`` options, unbuilt."""
    tokenizer: str | None
    """The datamodule's ``tokenizer`` (a tokenizer.json, an HF directory, ``bundled``); ``None``: the bundled one."""


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The model and tokenizer of the training recipe at ``path``; a recipe that cannot give them is a one-line
    :class:`~lightning_megatron.errors.UserError` naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; pass --config <the training recipe, e.g. {_EXAMPLE}>")
    try:
        sections = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"{path} is not valid YAML ({where}{getattr(error, 'problem', None) or error}); fix the "
                        f"recipe") from None
    if not isinstance(sections, dict) or not sections.get("model"):
        raise UserError(f"{path} has no model section; pass --config <the recipe the model was trained with, e.g. "
                        f"{_EXAMPLE}>")
    if isinstance(sections["model"], dict) and "class_path" not in sections["model"]:
        raise UserError(f"{path}'s model section has no class_path; set model.class_path to the module's class "
                        f"(lightning_megatron.GPT, ...), as fit requires")
    module = _instantiate(path, "model", sections["model"], pl.LightningModule)
    if not isinstance(module, MegatronModule):
        raise UserError(f"{path}'s model is a {type(module).__name__}, not a lightning_megatron module (GPT, Bert, "
                        f"T5 or another MegatronModule); pass --config <the recipe the model was trained with>")
    data = _instantiate(path, "data", sections["data"], pl.LightningDataModule) if sections.get("data") else None
    return Recipe(module, getattr(data, "tokenizer_spec", None))


def _instantiate(path: Path, section: str, value: object, base: type) -> object:
    """The object a recipe section describes, as ``fit`` builds it; a bad field is an error naming it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, section, required=True)
    try:
        return parser.instantiate_classes(parser.parse_object({section: value}))[section]
    except (argparse.ArgumentError, TypeError, ValueError) as error:
        # jsonargparse nests a report per level: the first key is the section, the others lead to the field.
        inner = re.findall(r'Parser key "([^"]+)"', str(error))[1:]
        where = ".".join([section, "init_args", *inner]) if inner else section
        raise UserError(f"{path}: {where}: {argument_error_reason(str(error))}; fix the recipe's {section} "
                        f"section") from None


__all__ = ["Recipe", "read_recipe"]
