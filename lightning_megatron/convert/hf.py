"""Import from and export to Hugging Face: whole-checkpoint conversions and loading into live modules.

A converted checkpoint is a directory of consolidated tensors (``model*.safetensors`` under megatron names, see
:mod:`lightning_megatron.convert.core`), the tokenizer files, and ``lightning_megatron.json`` naming the
architecture, our model config, the HF config it came from, and the parallel layout it was checked against.
It loads into a module of any TP/PP layout with :func:`load_checkpoint`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm.auto import tqdm

from lightning_megatron.convert.bert import Bert, BertEncoder
from lightning_megatron.convert.bloom import Bloom
from lightning_megatron.convert.consolidated import (
    SafetensorsFiles,
    TensorDict,
    gather_consolidated,
    load_consolidated,
)
from lightning_megatron.convert.core import Architecture, ConversionError, Converted, ShardedWriter, hf_tensors
from lightning_megatron.convert.gpt2 import GPT2
from lightning_megatron.convert.llama import Llama
from lightning_megatron.convert.t5 import T5
from lightning_megatron.models.lora import merge_adapters
from lightning_megatron.module import MegatronModule
from lightning_megatron.parallel import ParallelConfig

ARCHITECTURES: tuple[Architecture, ...] = (GPT2(), Llama(), Bloom(), Bert(), T5(), BertEncoder())
"""Every supported mapping; a live module exports with the first that matches it."""

METADATA = "lightning_megatron.json"
TRAINING_FIELDS = frozenset({"seed", "hidden_dropout", "attention_dropout", "init_method_std"})
"""Config fields that do not shape the weights: a module may differ from the checkpoint in these."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "tokenizer.model", "generation_config.json")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """An HF directory's ``config.json``."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise ConversionError(f"{path} has no config.json; pass a directory written by save_pretrained")
    return json.loads(file.read_text())


def architecture_for_hf(hf_config: dict[str, Any]) -> Architecture:
    """The mapping for an HF config's ``architectures`` entry."""
    names = hf_config.get("architectures") or []
    for arch in ARCHITECTURES:
        if any(name in arch.hf_architectures for name in names):
            return arch
    supported = sorted(n for arch in ARCHITECTURES for n in arch.hf_architectures)
    raise ConversionError(f"architecture {names or hf_config.get('model_type')!r} is not supported; "
                          f"supported HF architectures: {', '.join(supported)}")


def architecture_named(name: str) -> Architecture:
    """The mapping stored under ``name`` in a converted checkpoint."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise ConversionError(f"unknown architecture {name!r}; known: {[a.name for a in ARCHITECTURES]}")


def architecture_for_module(module: MegatronModule, hf_architecture: str | None = None) -> Architecture:
    """The mapping that can export a live module (the first that can, or the one writing ``hf_architecture``)."""
    for arch in ARCHITECTURES:
        if arch.matches(module) and hf_architecture in (None, *arch.hf_architectures):
            return arch
    fitting = [name for arch in ARCHITECTURES if arch.matches(module) for name in arch.hf_architectures]
    if hf_architecture is not None and fitting:
        raise ConversionError(f"a {type(module).__name__} cannot be written as {hf_architecture}; pass "
                              f"--architecture {' or '.join(fitting)}")
    raise ConversionError(f"no HF architecture matches this {type(module).__name__} and its config; supported: "
                          f"{[a.name for a in ARCHITECTURES]}")


def _config(arch: Architecture, hf_config: dict[str, Any], weights: SafetensorsFiles) -> Any:
    """Our model config of an HF config, with the optional parts ``weights`` (HF or converted) hold."""
    return arch.config_for_weights(arch.config_from_hf(hf_config), weights.keys())


def _copy_tokenizer(source: Path | None, target: Path) -> None:
    if source is None:
        return
    if source.is_file():
        shutil.copy2(source, target / "tokenizer.json")
        (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        return
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def hf_to_checkpoint(hf_dir: str | Path, out: str | Path, tensor_model_parallel_size: int = 1,
                     pipeline_model_parallel_size: int = 1, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Convert an HF directory into a consolidated checkpoint, streaming one tensor at a time.

    The layout is validated against the model (heads and query groups divisible by TP, layers by PP) and recorded;
    the checkpoint itself loads into any layout.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    arch = architecture_for_hf(hf_config)
    files = SafetensorsFiles(hf_dir, ConversionError)
    config = _config(arch, hf_config, files)
    layout = ParallelConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                            pipeline_model_parallel_size=pipeline_model_parallel_size)
    arch.check_layout(config, layout)
    source = Converted(arch.rules(config), files, arch.ignored_hf)
    writer = ShardedWriter(out, max_shard_bytes)
    for name in tqdm(source.keys(), desc=f"{arch.name} HF -> megatron", unit="tensor"):
        writer.add(name, source.get(name))
    metadata = {"format_version": 1, "architecture": arch.name, "config": asdict(config), "hf_config": hf_config,
                "layout": {"tensor_model_parallel_size": tensor_model_parallel_size,
                           "pipeline_model_parallel_size": pipeline_model_parallel_size}}
    (writer.files_dir() / METADATA).write_text(json.dumps(metadata, indent=2))
    _copy_tokenizer(hf_dir, writer.files_dir())
    return writer.finish()


def converted(path: str | Path | None) -> bool:
    """Whether ``path`` is a checkpoint written by :func:`hf_to_checkpoint` (it names its own architecture)."""
    return bool(path) and (Path(path) / METADATA).is_file()


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A converted checkpoint's ``lightning_megatron.json``."""
    file = Path(path) / METADATA
    if not file.exists():
        raise ConversionError(f"{path} has no {METADATA}; it is not a checkpoint written by hf-to-megatron")
    return json.loads(file.read_text())


def module_from_checkpoint(path: str | Path) -> MegatronModule:
    """An unbuilt module with the architecture and config of a converted checkpoint."""
    metadata = read_checkpoint_metadata(path)
    arch = architecture_named(metadata["architecture"])
    return arch.module(_config(arch, metadata["hf_config"], SafetensorsFiles(path, ConversionError)))


def load_checkpoint(module: MegatronModule, path: str | Path) -> None:
    """Load a converted checkpoint into a built module of any TP/PP layout."""
    vocab_size = read_checkpoint_metadata(path)["config"]["vocab_size"]
    load_consolidated(module, SafetensorsFiles(path, ConversionError), str(path), vocab_size, ConversionError)


def module_from_hf(hf_dir: str | Path) -> MegatronModule:
    """An unbuilt module with the architecture and config of an HF directory."""
    hf_config = read_hf_config(hf_dir)
    arch = architecture_for_hf(hf_config)
    return arch.module(_config(arch, hf_config, SafetensorsFiles(hf_dir, ConversionError)))


def load_hf(module: MegatronModule, hf_dir: str | Path) -> None:
    """Load an HF directory straight into a built module of any layout (each rank reads only what it needs)."""
    hf_config = read_hf_config(hf_dir)
    arch = architecture_for_hf(hf_config)
    files = SafetensorsFiles(hf_dir, ConversionError)
    expected = _config(arch, hf_config, files)
    diff = {k: (v, getattr(module.config, k)) for k, v in asdict(expected).items()
            if k not in TRAINING_FIELDS and getattr(module.config, k) != v}
    if diff:
        raise ConversionError(f"the module's config differs from {hf_dir}'s (field: (checkpoint, module)): {diff}")
    source = Converted(arch.rules(expected), files, arch.ignored_hf)
    load_consolidated(module, source, str(hf_dir), expected.vocab_size, ConversionError)


def _token_ids(tokenizer: str | Path | None) -> dict[str, int]:
    """``bos/eos/pad_token_id`` for the HF config of a model trained with ``tokenizer``: its end-of-document and
    padding tokens (without them transformers falls back to GPT-2's 50256, outside a small vocabulary)."""
    from lightning_megatron.data.tokenizer import Tokenizer

    try:
        found = Tokenizer(tokenizer) if tokenizer is not None else None
    except (FileNotFoundError, ValueError):  # no tokenizer.json, or no end-of-document token: nothing to name
        found = None
    return {} if found is None else {"bos_token_id": found.eod, "eos_token_id": found.eod, "pad_token_id": found.pad}


def _write_hf(arch: Architecture, config: Any, source: Any, out: str | Path, tokenizer: str | Path | None,
              max_shard_bytes: int, token_ids: dict[str, int]) -> Path:
    writer = ShardedWriter(out, max_shard_bytes)
    for name, tensor in hf_tensors(arch.rules(config), source):
        writer.add(name, tensor)
    hf_config = {**arch.config_to_hf(config), **token_ids, "dtype": "float32"}
    (writer.files_dir() / "config.json").write_text(json.dumps(hf_config, indent=2))
    _copy_tokenizer(Path(tokenizer) if tokenizer else None, writer.files_dir())
    return writer.finish()


def converted_to_hf(path: str | Path, out: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Convert a checkpoint of :func:`hf_to_checkpoint` into an HF ``save_pretrained`` directory, one tensor at a
    time (:func:`lightning_megatron.convert.export.checkpoint_to_hf` takes any checkpoint)."""
    metadata = read_checkpoint_metadata(path)
    arch = architecture_named(metadata["architecture"])
    files = SafetensorsFiles(path, ConversionError)
    config = _config(arch, metadata["hf_config"], files)
    token_ids = {key: value for key, value in metadata["hf_config"].items()
                 if key.endswith("_token_id") and value is not None}  # the special tokens it was imported with
    return _write_hf(arch, config, files, out, path, max_shard_bytes, token_ids)


def export_hf(module: MegatronModule, out: str | Path, tokenizer: str | Path | None = None,
              max_shard_bytes: int = 2 * 1024**3, architecture: str | None = None) -> Path | None:
    """Write a live module of any TP/PP layout as an HF directory (collective: call on every rank); a LoRA
    module's adapters are merged into it first.

    Rank 0 writes; ``tokenizer`` is an HF directory or a ``tokenizer.json`` to include; ``architecture`` the HF
    class to write where several fit (``BertModel``: a BERT's encoder alone). Returns the path on rank 0.
    """
    arch = architecture_for_module(module, architecture)
    merge_adapters(module.chunks or [])  # a LoRA model exports as the model it computes
    tensors = gather_consolidated(module, unpad=True)
    path = None
    if tensors is not None:
        # HF checkpoints of ours are fp32 whatever the training precision (config.json says so).
        full = TensorDict({name: t.float() if t.is_floating_point() else t for name, t in tensors.items()},
                          "the gathered model", ConversionError)
        path = _write_hf(arch, module.config, full, out, tokenizer, max_shard_bytes, _token_ids(tokenizer))
    if dist.is_initialized():
        dist.barrier()
    return path

