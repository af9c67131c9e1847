"""Load a trained GPT under a parallel layout and run inference code on every rank: the tools' common entry.

The Trainer does what it does for training - launches the processes, creates the process groups, builds this rank's
chunks, restores ``--ckpt`` through the strategy - by running ``trainer.predict`` on one warm-up prompt; then the
inference function runs on every rank with the loaded model (it must call collectives on all ranks alike).
"""

from __future__ import annotations

import argparse
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_megatron.checkpoint import load_lightning_file, read_saved_module
from lightning_megatron.data.tokenizer import Tokenizer
from lightning_megatron.errors import UserError
from lightning_megatron.generation.params import SamplingParams
from lightning_megatron.generation.predict import PromptsDataModule
from lightning_megatron.generation.quantize import MODES as QUANTIZE_MODES, quantize
from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.models.lora import LoRAConfig, merge_adapters
from lightning_megatron.models.saved import module_from_saved
from lightning_megatron.module import MegatronModule
from lightning_megatron.recipes import read_recipe
from lightning_megatron.strategy import MegatronStrategy

InferenceFn = Callable[[GPT, Tokenizer], Any]
"""Runs on every rank with the loaded model and the tokenizer; its value on global rank 0 is returned."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every inference tool takes: where the model comes from and how it is split."""
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", help="checkpoint to load: a directory saved by training (last.ckpt), one written by "
                                      "'convert hf-to-megatron', or a one-process Lightning .ckpt file; without it "
                                      "the model keeps its initial weights (smoke tests, benchmarks)")
    group.add_argument("--config", help="training recipe (YAML) naming the model config and the tokenizer; "
                                        "needed when the checkpoint does not carry the config")
    group.add_argument("--tokenizer", help="tokenizer.json or HF tokenizer dir (default: the recipe's, else bundled)")
    group.add_argument("--devices", type=int, default=1,
                       help="processes: a multiple of tp x pp (more make data-parallel replicas of the model)")
    group.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    group.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    group.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    group.add_argument("--precision", default="32-true", help="the precision the checkpoint was trained with")
    group.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                       help="int8: store the linear weights as int8 with per-output-channel scales (weight-only)")


def check_layout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The number of model replicas ``--devices`` / (``--tp`` x ``--pp``); a layout that cannot work is a
    command-line error naming the fix, before any process starts."""
    per_replica = args.tp * args.pp
    if min(args.devices, args.tp, args.pp) < 1 or args.devices % per_replica:
        parser.error(f"--devices {args.devices} is not a multiple of --tp x --pp = {per_replica}: each replica of "
                     f"the model takes tp x pp processes")
    return args.devices // per_replica


def converted(ckpt: str | None) -> bool:
    """Whether ``ckpt`` is a checkpoint written by ``convert hf-to-megatron`` (it names its own architecture)."""
    from lightning_megatron.convert.hf import converted as is_converted

    return is_converted(ckpt)


def model_and_tokenizer(ckpt: str | None, config: str | None) -> tuple[GPT, str | None]:
    """The GPT to load (unbuilt, with its LoRA adapters and ``init_from``) and its tokenizer: a converted checkpoint's
    own (its directory holds the tokenizer, else the recipe's), else the recipe's
    (:func:`~lightning_megatron.recipes.read_recipe`), else what a training checkpoint saved
    (:func:`~lightning_megatron.checkpoint.read_saved_module`; the bundled tokenizer)."""
    _check_exists(ckpt)
    if converted(ckpt):
        from lightning_megatron.convert.hf import module_from_checkpoint

        module = _gpt(module_from_checkpoint(ckpt), f"{ckpt} holds")
        own = ckpt if (Path(ckpt) / "tokenizer.json").is_file() else None
        return module, own or (read_recipe(config).tokenizer if config else None)
    if config:
        recipe = read_recipe(config)
        return _gpt(recipe.module, f"{config}'s model is"), recipe.tokenizer
    if not ckpt:
        raise UserError("cannot tell the model's architecture: pass --config <training recipe.yaml> or --ckpt")
    return _gpt(module_from_saved(read_saved_module(ckpt)), f"{ckpt} holds"), None


def _check_exists(ckpt: str | None) -> None:
    if ckpt and not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist; pass --ckpt <the path of a saved checkpoint>")


def _gpt(module: MegatronModule, source: str) -> GPT:
    if not isinstance(module, GPT):
        raise UserError(f"{source} a {type(module).__name__}; generation, serving and evaluation run GPTs")
    return module


class _RunAfterWarmup(pl.Callback):
    def __init__(self, fn: InferenceFn, load: Callable[[GPT], None] | None, quantize: str | None = None) -> None:
        self.fn = fn
        self.load = load
        self.quantize = quantize
        self.result: Any = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.load is not None:
            self.load(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        merge_adapters(pl_module.chunks)
        if self.quantize is not None:
            quantize(pl_module, self.quantize)
        self.result = self.fn(pl_module, trainer.datamodule.tokenizer)


def run_inference(args: argparse.Namespace, fn: InferenceFn) -> Any:
    """Load the model described by :func:`add_model_arguments`'s ``args`` and run ``fn`` on every rank."""
    module, model_tokenizer = model_and_tokenizer(args.ckpt, args.config)
    # The base weights are loaded only under adapters that were saved without them.
    base = module.init_from if module.lora is not None and module.lora.adapters_only else None
    return run_with_model(module.config, fn, ckpt=args.ckpt, tokenizer=args.tokenizer or model_tokenizer,
                          devices=args.devices, tp=args.tp, pp=args.pp, accelerator=args.accelerator,
                          precision=args.precision, quantize=args.quantize, lora=module.lora, init_from=base)


def run_with_model(config: GPTConfig, fn: InferenceFn, ckpt: str | None = None, tokenizer: str | None = None,
                   devices: int = 1, tp: int = 1, pp: int = 1, accelerator: str = "auto",
                   precision: str = "32-true", quantize: str | None = None, lora: LoRAConfig | None = None,
                   init_from: str | None = None) -> Any:
    """Build a GPT of ``config`` under TP x PP (weights from ``ckpt`` if given) and run ``fn`` on every rank.

    ``quantize`` (``"int8"``) quantizes the loaded weights before ``fn`` runs (see :mod:`.quantize`). A ``lora``
    model's adapters are merged into its weights once loaded (``init_from``: the base model of an adapters-only
    checkpoint). Returns ``fn``'s value on global rank 0 (``None`` elsewhere).
    """
    _check_exists(ckpt)
    if ckpt and Path(ckpt).is_file() and tp * pp > 1:
        raise UserError(f"{ckpt} is a Lightning .ckpt, which holds the weights of one process only; load it "
                        f"with --tp 1 --pp 1, or save a sharded checkpoint to generate under TP/PP")
    if not ckpt:
        rank_zero_warn("no --ckpt given: the model has its initial (untrained) weights")
    model = GPT(config, lora=lora, init_from=init_from)
    data = PromptsDataModule(prompts=["Hello"], tokenizer=tokenizer, params=SamplingParams(max_new_tokens=1))
    # A Lightning .ckpt file and a converted checkpoint are loaded here; a sharded checkpoint by the strategy.
    load: Callable[[GPT], None] | None = None
    if ckpt and Path(ckpt).is_file():
        load = lambda module: load_lightning_file(module.chunks, ckpt)
    elif converted(ckpt):
        from lightning_megatron.convert.hf import load_checkpoint

        load = partial(load_checkpoint, path=ckpt)
    run = _RunAfterWarmup(fn, load, quantize)
    trainer = pl.Trainer(
        strategy=MegatronStrategy(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        accelerator=accelerator, devices=devices, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[run],
    )
    with warnings.catch_warnings():
        # Lightning asks for the training run's callbacks to restore their state; inference needs none of them.
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        trainer.predict(model, datamodule=data, ckpt_path=None if load else ckpt, return_predictions=False)
    return run.result if trainer.is_global_zero else None
