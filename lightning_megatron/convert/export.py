"""``megatron-to-hf`` from any checkpoint: one written by ``fit`` (any TP/PP/VP/CP/DP layout) or by ``hf-to-megatron``.

The model comes from the training recipe (``--config``, read as ``fit`` reads it by
:func:`~lightning_megatron.recipes.read_recipe`) or, without one, from the checkpoint itself
(:func:`~lightning_megatron.checkpoint.read_saved_module`: the module class, config and LoRA settings it saved); a
one-process Lightning ``.ckpt`` file converts too. The tokenizer is ``--tokenizer``, else the recipe datamodule's,
else the bundled corpus's (what a recipe without a ``tokenizer`` trains with). The model is built in this one
process on the CPU, where megatron's ``dist_checkpointing`` reshards whatever layout the checkpoint was saved in,
and written by :func:`~lightning_megatron.convert.hf.export_hf`.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_megatron import parallel
from lightning_megatron.checkpoint import (
    LAYOUT_FILE,
    MegatronCheckpointIO,
    SavedModule,
    load_lightning_file,
    read_saved_module,
)
from lightning_megatron.convert.core import ConversionError, build_module
from lightning_megatron.convert.hf import (
    METADATA,
    TRAINING_FIELDS,
    converted,
    converted_to_hf,
    export_hf,
    load_checkpoint,
    module_from_checkpoint,
)
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.data.megatron_datasets import process_group_for_build
from lightning_megatron.data.tokenizer import load_tokenizer
from lightning_megatron.models.saved import module_from_saved
from lightning_megatron.module import MegatronModule
from lightning_megatron.parallel import ParallelConfig
from lightning_megatron.pretrained import load_pretrained
from lightning_megatron.recipes import read_recipe

_PRECISIONS = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}
"""A checkpoint's ``params_dtype`` -> the precision its module is built with to load it."""


def _check_recipe_fits(module: MegatronModule, saved: SavedModule) -> None:
    """A recipe whose model is not the checkpoint's fails here, naming the fields that differ."""
    path = saved.weights
    if saved.module is not None and type(module).__qualname__ != saved.module:
        raise ConversionError(f"{path} holds a {saved.module}, the recipe's model is a {type(module).__name__}; "
                              f"pass --config <the recipe it was trained with> (or leave --config out)")
    config = saved.init_args.get("config")
    current = dataclasses.asdict(module.config)
    diff = {key: (value, current.get(key)) for key, value in (config if isinstance(config, dict) else {}).items()
            if key not in TRAINING_FIELDS and current.get(key) != value}
    if diff:
        raise ConversionError(f"the recipe's model differs from the one {path} holds (field: (checkpoint, recipe)): "
                              f"{diff}; pass --config <the recipe it was trained with> (or leave --config out)")


def load_any_checkpoint(module: MegatronModule, path: str | Path) -> None:
    """Load the weights of a checkpoint written by ``fit`` (sharded directory, any layout; or a one-process Lightning
    ``.ckpt`` file) or by ``hf-to-megatron`` into a built module of any layout; every rank calls it.

    A ``fit`` checkpoint's vocabulary rows are padded for the TP size it was saved with: the module's padded
    vocabulary must be the same (:func:`checkpoint_to_hf` scales ``make_vocab_size_divisible_by`` for that).
    """
    path = Path(path)
    if converted(path):
        load_checkpoint(module, path)
    elif path.is_file():
        assert module.chunks is not None
        load_lightning_file(module.chunks, path)
    else:
        if module.lora is not None and module.lora.adapters_only and module.init_from:
            load_pretrained(module, module.init_from)  # the base weights the adapters were trained on
        io = MegatronCheckpointIO()
        io.load_checkpoint(path)  # validates: a damaged shard is named before any read
        module.load_checkpoint_state_dict(io.load_sharded(path, module.checkpoint_state_dict()))


def _saved_module(path: Path) -> SavedModule:
    """What a ``fit`` checkpoint saved of its module, or a one-line error saying what ``path`` is instead."""
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist; pass --ckpt <a checkpoint directory written by "
                              f"fit or hf-to-megatron, e.g. runs/gpt-tiny/checkpoints/last.ckpt>")
    if path.is_dir() and not (path / LAYOUT_FILE).is_file() and not any(path.glob("*.distcp")):
        raise ConversionError(f"{path} is not a checkpoint (no {LAYOUT_FILE}, no {METADATA}); pass "
                              f"--ckpt <a checkpoint directory written by fit or hf-to-megatron>")
    return read_saved_module(path)


def checkpoint_to_hf(ckpt: str | Path, out: str | Path, config: str | Path | None = None,
                     tokenizer: str | Path | None = None, architecture: str | None = None,
                     max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a checkpoint of ``fit`` or ``hf-to-megatron`` (or a one-process Lightning ``.ckpt`` file) as an HF
    ``save_pretrained`` directory with its tokenizer.

    ``config`` is the training recipe (needed only when the checkpoint carries no model config), ``tokenizer`` a
    tokenizer.json or HF directory overriding the recipe's, ``architecture`` the HF class to write when several fit
    the model (``BertModel`` for a BERT's encoder alone). Call it in a process without other process groups.
    """
    ckpt = Path(ckpt)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConversionError(f"tokenizer {tokenizer} does not exist; pass --tokenizer <a tokenizer.json or an HF "
                              f"tokenizer directory>")
    layout, recipe_tokenizer = None, None
    if converted(ckpt):
        if architecture is None:
            return converted_to_hf(ckpt, out, max_shard_bytes)
        module, tokenizer = module_from_checkpoint(ckpt), tokenizer or ckpt
    else:
        saved = _saved_module(ckpt)
        layout = saved.layout  # None for a one-process .ckpt file: TP 1, its tensors copied into fp32 ones
        if config is None:
            module = module_from_saved(saved)
        else:
            recipe = read_recipe(config)
            module, recipe_tokenizer = recipe.module, recipe.tokenizer
            _check_recipe_fits(module, saved)
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe_tokenizer).path
        if config is None:
            rank_zero_info(f"tokenizer: the bundled corpus's ({tokenizer}); pass --tokenizer <tokenizer.json or HF "
                           f"directory> if the model was trained with another")
    precision = "32-true"
    if layout is not None:
        precision = _PRECISIONS.get(layout.params_dtype, "32-true")
        # Pad the vocabulary as the saving layout did, so that its vocabulary tensors load unchanged.
        tp = layout.parallel.tensor_model_parallel_size
        module.config = dataclasses.replace(
            module.config, make_vocab_size_divisible_by=module.config.make_vocab_size_divisible_by * tp)
    with ExitStack() as stack:
        stack.enter_context(process_group_for_build())
        stack.enter_context(CPUEmulation())
        parallel.initialize(ParallelConfig(), seed=module.config.seed)
        stack.callback(parallel.destroy)
        build_module(module, ParallelConfig(), precision)
        load_any_checkpoint(module, ckpt)
        path = export_hf(module, out, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                         architecture=architecture)
    assert path is not None  # one process: it is rank 0
    return path
