"""What a checkpoint saved of its module, read back by generation and export without a recipe: a LoRA run's weights
load with their adapters from a sharded directory, an adapters-only one (joined to its base) and a one-process
Lightning ``.ckpt`` file, and a damaged file of saved hyper-parameters is a one-line error naming it and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from peft import PeftModel

from lightning_megatron import GPT, GPTConfig, MegatronStrategy, OptimConfig, ParallelConfig, parallel
from lightning_megatron.checkpoint import TRAINER_FILE, CheckpointError, read_saved_module
from lightning_megatron.convert.consolidated import export_consolidated
from lightning_megatron.convert.core import build_module
from lightning_megatron.convert.export import checkpoint_to_hf
from lightning_megatron.convert.hf import export_hf
from lightning_megatron.convert.peft import checkpoint_to_peft
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.data import TextDataModule
from lightning_megatron.data.megatron_datasets import process_group_for_build
from lightning_megatron.generation.session import run_inference
from lightning_megatron.models.lora import LoRAConfig
from lightning_megatron.parallel import unwrap

VOCAB = 4096  # the bundled tokenizer's
SEQ = 32
CONFIG = GPTConfig.tiny(VOCAB, num_layers=2, hidden_size=64, seq_length=SEQ)
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
KINDS = ["directory", "file", "adapters-only"]


def logits_of(model: GPT) -> torch.Tensor:
    positions = torch.arange(SEQ).expand_as(TOKENS)
    with torch.no_grad():
        return unwrap(model.chunks[0])(TOKENS, positions, None)[..., :VOCAB].clone()


def fit(root: Path, name: str, lora: LoRAConfig, init_from: str) -> GPT:
    """A LoRA GPT trained 3 steps in one process, saved as ``<root>/<name>.ckpt`` (a sharded directory)."""
    model = GPT(CONFIG, OptimConfig(lr=1e-2, warmup_steps=0), lora=lora, init_from=init_from)
    trainer = L.Trainer(strategy=MegatronStrategy(), accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=TextDataModule(seq_length=SEQ, global_batch_size=4, micro_batch_size=2))
    trainer.save_checkpoint(root / f"{name}.ckpt")
    return model


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> dict:
    """LoRA runs from one base model (``init_from``: consolidated weights, also exported to HF), each saved with the
    logits of the trained module: a whole sharded checkpoint, the same module as a one-process Lightning ``.ckpt``
    file, and an adapters-only checkpoint. The base is not what the model's seed draws, so an adapters-only
    checkpoint loaded without its base would give other logits."""
    root = tmp_path_factory.mktemp("lora")
    with process_group_for_build(), CPUEmulation():
        parallel.initialize(ParallelConfig(), seed=1)
        base = build_module(GPT(dataclasses.replace(CONFIG, seed=7)), ParallelConfig())
        export_hf(base, root / "hf-base")
        export_consolidated(base, root / "base.safetensors")
        runs = {"base": logits_of(base), "root": root}
        parallel.destroy()
    whole = fit(root, "directory", LoRAConfig(rank=4, alpha=8), init_from=str(root / "base.safetensors"))
    # What Lightning writes for a module trained in one process: its state_dict beside its hyper-parameters.
    torch.save({"state_dict": whole.state_dict(), "hyper_parameters": dict(whole.hparams)}, root / "file.ckpt")
    adapters = fit(root, "adapters-only", LoRAConfig(rank=4, alpha=8, adapters_only=True),
                   init_from=str(root / "base.safetensors"))
    with CPUEmulation():
        runs["directory"] = runs["file"] = logits_of(whole)
        runs["adapters-only"] = logits_of(adapters)
    for kind in KINDS:
        assert (runs[kind] - runs["base"]).abs().max() > 1e-2, f"{kind}: the adapters changed nothing"
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_generation_loads_a_lora_checkpoint_with_its_adapters(lora_runs, kind):
    args = argparse.Namespace(ckpt=str(lora_runs["root"] / f"{kind}.ckpt"), config=None, tokenizer=None, devices=1,
                              tp=1, pp=1, accelerator="cpu", precision="32-true", quantize=None)
    loaded = run_inference(args, lambda model, tokenizer: logits_of(model))  # adapters merged into the weights
    torch.testing.assert_close(loaded, lora_runs[kind], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_export_of_a_lora_checkpoint_computes_the_trained_module(lora_runs, kind, tmp_path):
    ckpt = lora_runs["root"] / f"{kind}.ckpt"
    checkpoint_to_hf(ckpt, tmp_path / "merged")
    checkpoint_to_peft(ckpt, None, tmp_path / "adapter")  # the LoRA settings come from the checkpoint too
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(TOKENS).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(lora_runs["root"] / "hf-base").eval()
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(TOKENS).logits
    torch.testing.assert_close(merged, lora_runs[kind], rtol=0, atol=1e-4)
    torch.testing.assert_close(adapted, lora_runs[kind], rtol=0, atol=1e-4)


def test_init_from_an_adapters_only_checkpoint_names_its_base(lora_runs, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds only LoRA adapters .*set init_from to the base model's "
                                              r"checkpoint \(.*base.safetensors\)"):
        fit(tmp_path, "again", LoRAConfig(rank=4, alpha=8), init_from=str(lora_runs["root"] / "adapters-only.ckpt"))


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "random"])
@pytest.mark.parametrize("kind", ["directory", "file"])
def test_damaged_saved_hyper_parameters_are_a_one_line_error(lora_runs, kind, how, tmp_path, cli_error):
    ckpt = tmp_path / f"{kind}.ckpt"
    if kind == "directory":
        shutil.copytree(lora_runs["root"] / ckpt.name, ckpt)
        damaged, fix = ckpt / TRAINER_FILE, "copy the checkpoint again, or use an earlier one"
    else:
        shutil.copy(lora_runs["root"] / ckpt.name, ckpt)
        damaged, fix = ckpt, "copy it again, or save it again from the run that trained it"
    _damage(damaged, how)
    expected = f"{damaged} is truncated or corrupt ("
    with pytest.raises(CheckpointError) as error:
        read_saved_module(ckpt)
    assert str(error.value).startswith(expected) and str(error.value).endswith(fix)
    for argv in (["generate", "--ckpt", str(ckpt), "--prompt", "In"],
                 ["convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]):
        line = cli_error(argv)
        assert line.startswith(f"error: {expected}") and line.endswith(fix), line
