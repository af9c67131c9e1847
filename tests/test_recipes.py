"""A training recipe read for generation and export as ``fit`` reads it: every bundled recipe gives its module (unbuilt,
with its config, LoRA settings and ``init_from``) and its datamodule's tokenizer, and a recipe that cannot is a
one-line error naming the fix, from the reader and from the commands that take ``--config``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from launch import REPO
from lightning_megatron import GPT, ParallelConfig, parallel
from lightning_megatron.cli import main
from lightning_megatron.convert.core import build_module
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.data.megatron_datasets import process_group_for_build
from lightning_megatron.errors import UserError
from lightning_megatron.models.bert import Bert
from lightning_megatron.models.t5 import T5
from lightning_megatron.recipes import read_recipe

RECIPES = REPO / "recipes"
BUNDLED = {"gpt-tiny": (GPT, None), "gpt-tiny-lora": (GPT, None), "gpt-tiny-lora-sft": (GPT, None),
           "gpt2-124m-pretrain": (GPT, "bundled"), "bert-tiny": (Bert, None), "t5-tiny": (T5, None)}
"""Each recipe under recipes/: its module class and its datamodule's tokenizer."""


def test_every_recipe_gives_its_module_and_tokenizer():
    assert sorted(BUNDLED) == sorted(path.stem for path in RECIPES.glob("*.yaml"))
    for name, (module_class, tokenizer) in BUNDLED.items():
        init_args = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["model"]["init_args"]
        recipe = read_recipe(RECIPES / f"{name}.yaml")
        module = recipe.module
        assert type(module) is module_class and recipe.tokenizer == tokenizer, name
        config = dataclasses.asdict(module.config)
        assert {key: config[key] for key in init_args["config"]} == init_args["config"], name
        lora = init_args.get("lora")
        assert (module.lora and {key: getattr(module.lora, key) for key in lora}) == lora, name
        assert module.init_from == init_args.get("init_from") and module.chunks is None, name


def _edited(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    """A recipe written under a test's directory: gpt-tiny's, changed by ``edit``."""
    def write(directory: Path) -> Path:
        sections = yaml.safe_load((RECIPES / "gpt-tiny.yaml").read_text())
        edit(sections)
        path = directory / "recipe.yaml"
        path.write_text(yaml.safe_dump(sections))
        return path
    return write


def _text(text: str) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / "recipe.yaml"
        path.write_text(text)
        return path
    return write


BAD = {
    "missing": (lambda directory: directory / "nowhere.yaml",
                "nowhere.yaml does not exist; pass --config <the training recipe, e.g. recipes/gpt-tiny.yaml>"),
    "not-yaml": (_text("model:\n  class_path: [lightning_megatron.GPT\n"),
                 "recipe.yaml is not valid YAML (line 3: expected ',' or ']', but got '<stream end>'); fix the recipe"),
    "no-model": (_edited(lambda sections: sections.pop("model")),
                 "recipe.yaml has no model section; pass --config <the recipe the model was trained with"),
    "no-class-path": (_edited(lambda sections: sections["model"].pop("class_path")),
                      "recipe.yaml's model section has no class_path; set model.class_path to the module's class"),
    "mistyped-field": (_edited(lambda sections: sections["model"]["init_args"]["config"].update(hidden_sise=64)),
                       "recipe.yaml: model: Group 'config' does not accept option 'hidden_sise'; fix the recipe's "
                       "model section"),
    "bad-value": (_edited(lambda sections: sections["model"]["init_args"].update(lora={"rank": "eight"})),
                  "recipe.yaml: model.init_args.lora.rank: Expected a <class 'int'>. Got value: eight; fix the "
                  "recipe's model section"),
    "bad-data": (_edited(lambda sections: sections["data"]["init_args"].update(val_fraction=3)),
                 "recipe.yaml: data: val_fraction must be between 0 and 1, got 3.0; fix the recipe's data section"),
    "not-ours": (_edited(lambda sections: sections.update(model={
                     "class_path": "lightning.pytorch.demos.boring_classes.BoringModel"})),
                 "recipe.yaml's model is a BoringModel, not a lightning_megatron module (GPT, Bert, T5 or another "
                 "MegatronModule); pass --config <the recipe the model was trained with>"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_recipe_that_cannot_give_its_model_is_a_one_line_error_naming_the_fix(name, tmp_path):
    write, expected = BAD[name]
    with pytest.raises(UserError) as error:
        read_recipe(write(tmp_path))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_generation_reads_the_recipe_in_one_line_errors(tmp_path, cli_error):
    write, expected = BAD["bad-value"]
    assert expected in cli_error(["generate", "--config", str(write(tmp_path)), "--prompt", "In"])
    bert = RECIPES / "bert-tiny.yaml"
    assert cli_error(["generate", "--config", str(bert), "--prompt", "In"]) == (
        f"error: {bert}'s model is a Bert; generation, serving and evaluation run GPTs")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """gpt-tiny-lora's model (untrained) as a one-process Lightning ``.ckpt`` file: its state_dict beside the
    hyper-parameters it saves."""
    path = tmp_path_factory.mktemp("lora") / "lora.ckpt"
    module = read_recipe(RECIPES / "gpt-tiny-lora.yaml").module
    with process_group_for_build(), CPUEmulation():
        parallel.initialize(ParallelConfig(), seed=1)
        build_module(module, ParallelConfig())
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
        parallel.destroy()
    return path


def test_export_reads_the_recipe_in_one_line_errors(lora_file, tmp_path, cli_error):
    write, expected = BAD["bad-value"]
    recipe = write(tmp_path)
    for adapter_only in ([], ["--adapter-only"]):
        argv = ["convert", "megatron-to-hf", "--ckpt", str(lora_file), "--out", str(tmp_path / "out"),
                "--config", str(recipe), *adapter_only]
        assert expected in cli_error(argv)
    base = RECIPES / "gpt-tiny.yaml"
    assert cli_error(["convert", "megatron-to-hf", "--ckpt", str(lora_file), "--out", str(tmp_path / "out"),
                            "--config", str(base), "--adapter-only"]) == (
        f"error: {base}'s model has no LoRA adapters; set model.init_args.lora in the training recipe (as "
        f"recipes/gpt-tiny-lora.yaml does), or export the whole model without --adapter-only")
    assert not (tmp_path / "out").exists()


def test_adapter_only_export_takes_the_lora_recipes_settings(lora_file, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["convert", "megatron-to-hf", "--ckpt", str(lora_file), "--out", str(tmp_path / "adapter"),
              "--config", str(RECIPES / "gpt-tiny-lora.yaml"), "--adapter-only"])
    assert done.value.code == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert config["base_model_name_or_path"] == "runs/gpt-tiny/checkpoints/last.ckpt"  # the recipe's init_from
    targets = config["target_modules"]  # transformer.h.<layer>.<module>: the recipe's four targets in its 4 layers
    assert len(targets) == 16 and {target.split(".", 3)[3] for target in targets} == {"attn.c_attn", "attn.c_proj",
                                                                                      "mlp.c_fc", "mlp.c_proj"}


def test_adapter_only_export_refuses_a_recipe_that_does_not_fit_the_checkpoint(lora_file, tmp_path, cli_error):
    recipe = yaml.safe_load((RECIPES / "gpt-tiny-lora.yaml").read_text())
    recipe["model"]["init_args"]["lora"]["rank"] = 4  # the checkpoint's adapters have rank 8
    path = tmp_path / "rank4.yaml"
    path.write_text(yaml.safe_dump(recipe))
    line = cli_error(["convert", "megatron-to-hf", "--ckpt", str(lora_file), "--out", str(tmp_path / "out"),
                      "--config", str(path), "--adapter-only"])
    assert line.startswith(f"error: {lora_file} does not fit model chunk 0 (32 tensor(s): "), line
    assert "has shape (8, 128), the model (4, 128)" in line and "with the model it was trained with" in line, line
    assert not (tmp_path / "out").exists()
