"""LoRA adapters as a Hugging Face PEFT adapter directory, which ``peft`` loads onto the base model's HF export.

The directory holds ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``, ...)
and ``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight`` / ``lora_B.weight``. PEFT
adapts HF's modules, so each adapter is mapped with its base weight's conversion rule: ``B``'s output rows go
through the same reordering and splitting as the base weight's (GPT-2's ``c_attn`` order, Llama's separate
q/k/v and gate/up projections), and a fused layer's single ``A`` is shared by every HF module it feeds, which
computes exactly the fused update.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lightning_megatron import parallel
from lightning_megatron.checkpoint import (
    MegatronCheckpointIO,
    load_lightning_file,
    model_sharded_state_dict,
    read_saved_module,
)
from lightning_megatron.convert.consolidated import gather_consolidated
from lightning_megatron.convert.core import ConversionError, Rule, build_module
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.models.lora import ADAPTER_SUFFIX, LoRAConfig, adapter_state
from lightning_megatron.models.saved import module_from_saved
from lightning_megatron.module import MegatronModule
from lightning_megatron.parallel import ParallelConfig, unwrap
from lightning_megatron.recipes import read_recipe

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _hf_rows(rule: Rule, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``B`` (``[out, rank]``, megatron's row order) as the HF modules' ``lora_B`` weights of ``rule``'s weight."""
    # A rule maps [out, in] weights; whether it also transposes (GPT-2's Conv1D) shows on a probe whose two sizes
    # differ, since B's rank may equal a part's size.
    transposed = rule.to_hf(torch.zeros(b.shape[0], b.shape[0] + 1))[0].shape[0] == b.shape[0] + 1
    return tuple(part.t().contiguous() if transposed else part.contiguous() for part in rule.to_hf(b))


def peft_tensors(rules: list[Rule], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's ``adapter_model.safetensors`` tensors from a LoRA model's consolidated tensors."""
    by_name = {rule.megatron: rule for rule in rules}
    out: dict[str, torch.Tensor] = {}
    for name in tensors:
        if not name.endswith(f"{ADAPTER_SUFFIX}.a.weight"):
            continue
        base = name.removesuffix(f"{ADAPTER_SUFFIX}.a.weight") + ".weight"
        if base not in by_name:
            raise ConversionError(f"{base} has a LoRA adapter but no Hugging Face counterpart")
        rule = by_name[base]
        a = tensors[name].float().contiguous()
        b = tensors[name.removesuffix("a.weight") + "b.weight"].float()
        for hf_name, b_part in zip(rule.hf, _hf_rows(rule, b)):
            module = hf_name.removesuffix(".weight")
            out[f"base_model.model.{module}.lora_A.weight"] = a.clone()
            out[f"base_model.model.{module}.lora_B.weight"] = b_part
    return out


def export_peft(module: MegatronModule, out: str | Path, base_model_name_or_path: str = "") -> Path | None:
    """Write a built LoRA module's adapters (any layout) as a PEFT directory; collective, rank 0 writes.

    ``base_model_name_or_path`` is recorded for PEFT (the base model's HF export). Returns the path on rank 0.
    """
    from lightning_megatron.convert.hf import architecture_for_module

    lora = _lora_of(module, "the model")
    arch = architecture_for_module(module)
    tensors = gather_consolidated(module)
    path = None
    if tensors is not None:
        weights = peft_tensors(arch.rules(module.config), tensors)
        targets = sorted({key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                          for key in weights if key.endswith("lora_A.weight")})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
                  "lora_dropout": lora.dropout, "target_modules": targets, "bias": "none",
                  "fan_in_fan_out": arch.name == "gpt2", "base_model_name_or_path": base_model_name_or_path,
                  "inference_mode": True}
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return path


def _lora_of(module: MegatronModule, name: str) -> LoRAConfig:
    """The module's LoRA settings, or an error saying that ``name`` (the model, the recipe's) has no adapters."""
    if module.lora is None:
        raise ConversionError(f"{name} has no LoRA adapters; set model.init_args.lora in the training recipe (as "
                              f"recipes/gpt-tiny-lora.yaml does), or export the whole model without --adapter-only")
    return module.lora


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """megatron's parallel state for one process on the CPU (a one-process gloo group if none exists)."""
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with CPUEmulation():
            parallel.initialize(ParallelConfig(), seed=0)
            yield
            parallel.destroy()
    finally:
        if ours:
            dist.destroy_process_group()


def checkpoint_to_peft(ckpt: str | Path, recipe: str | Path | None, out: str | Path) -> Path:
    """Write the adapters of a LoRA run's checkpoint (whole or adapters-only; a directory or a one-process ``.ckpt``
    file) as a PEFT directory, in one process; the model is the recipe's, else the one the checkpoint saved."""
    saved = read_saved_module(ckpt)
    module = read_recipe(recipe).module if recipe else module_from_saved(saved)
    _lora_of(module, f"{recipe}'s model" if recipe else f"{ckpt}")  # before building and loading it
    with _one_process():
        build_module(module, ParallelConfig())
        assert module.chunks is not None
        if saved.layout is None:
            load_lightning_file(module.chunks, ckpt)
        else:
            template = {name: adapter_state(state) for name, state in model_sharded_state_dict(module.chunks).items()}
            loaded = MegatronCheckpointIO().load_sharded(ckpt, template)
            for name, chunk in zip(template, module.chunks):
                unwrap(chunk).load_state_dict(loaded[name], strict=False)
        path = export_peft(module, out, str(module.init_from or saved.init_args.get("init_from") or ""))
    assert path is not None
    return path


__all__ = ["checkpoint_to_peft", "export_peft", "peft_tensors"]
