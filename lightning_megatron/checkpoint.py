"""Sharded checkpoints on megatron-core's ``dist_checkpointing``: every rank writes its shard, nothing is half-written.

A checkpoint is a directory (its name may end in ``.ckpt``, as ModelCheckpoint names them) holding

* megatron's sharded model and optimizer state (``metadata.json``, ``common.pt``, ``.metadata``, ``*.distcp``;
  the optimizer's comes from :mod:`lightning_megatron.optim`), stored with layers stacked on a layer axis so that
  it loads under another TP/PP layout;
* ``trainer.pt`` - Lightning's own state (loop progress, callbacks, schedulers, precision, datamodule, hparams);
* ``layout.json`` - the parallel layout, step, dtype and module class it was saved with; written last, it marks
  completion.

Every save goes to ``<name>.partial`` first and is renamed to ``<name>`` only when all ranks have finished, so a
checkpoint path that exists is always complete, and a process killed mid-save leaves the previous checkpoint
untouched. With ``async_save=True`` the shards are written by a forked process while training continues;
the rename happens when a later step (or teardown) finds every rank done.

:func:`read_saved_module` is the one reader of what a checkpoint saved of its module (class, hyper-parameters, where
the weights are), for this format and for a one-process Lightning ``.ckpt`` file; generation, export and
``init_from`` all go through it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from torch.distributed.checkpoint import FileSystemReader
from typing_extensions import override

from lightning_megatron.atomic import atomic_write
from lightning_megatron.errors import UserError
from lightning_megatron.models.lora import is_adapter
from lightning_megatron.parallel import ParallelConfig, unwrap

FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
TRAINER_FILE = "trainer.pt"
PARTIAL_SUFFIX = ".partial"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model; the message says what to do."""


@dataclass
class CheckpointLayout:
    """How a checkpoint was saved: written to ``layout.json`` and checked before anything is loaded."""

    global_step: int
    epoch: int
    parallel: ParallelConfig
    data_parallel_size: int
    world_size: int
    distributed_optimizer: bool
    params_dtype: str
    has_optimizer: bool
    module: str
    format_version: int = FORMAT_VERSION

    @property
    def model_parallel(self) -> tuple[int, int, int | None, int]:
        """(TP, PP, VP, CP): what the distributed optimizer's state cannot be resharded across."""
        p = self.parallel
        return p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.vp, p.context_parallel_size

    def describe(self) -> str:
        """One line for logs and errors: ``TP2 PP1 VP- CP1 DP2 (4 ranks), step 5``."""
        p = self.parallel
        return (f"TP{p.tensor_model_parallel_size} PP{p.pipeline_model_parallel_size} VP{p.vp or '-'} "
                f"CP{p.context_parallel_size} DP{self.data_parallel_size} ({self.world_size} ranks), "
                f"step {self.global_step}")

    def to_dict(self) -> dict[str, Any]:
        """The ``layout.json`` form: one flat object, the parallel sizes among the other fields."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "parallel"}
        return {**flat, **asdict(self.parallel)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointLayout:
        """The layout of a ``layout.json`` object (unknown keys, from later versions, are ignored)."""
        own = {f.name for f in fields(cls)} - {"parallel"}
        parallel_fields = {f.name for f in fields(ParallelConfig)}
        return cls(**{k: v for k, v in data.items() if k in own},
                   parallel=ParallelConfig(**{k: v for k, v in data.items() if k in parallel_fields}))


def read_layout(path: _PATH) -> CheckpointLayout:
    """Read and check a checkpoint's ``layout.json``; raise a clear error if the checkpoint is absent or incomplete."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        hint = f" ({partial.name} exists: that save never finished)" if partial.exists() else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}; pass the path of a saved checkpoint "
                                f"directory or ckpt_path='last'")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a megatron checkpoint directory; checkpoints saved by the "
                              f"megatron strategy are directories (load other files with torch.load)")
    missing = [name for name in (LAYOUT_FILE, "metadata.json", TRAINER_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {', '.join(missing)}): it was not written to "
                              f"the end; resume from an earlier checkpoint")
    try:
        data = json.loads((path / LAYOUT_FILE).read_text())
    except ValueError as error:  # invalid JSON or UTF-8
        raise CheckpointError(f"{path / LAYOUT_FILE} is truncated or corrupt ({error}); {_COPY_AGAIN}") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data.get('format_version')}, this version of "
                              f"lightning_megatron reads version {FORMAT_VERSION}")
    return CheckpointLayout.from_dict(data)


@dataclass(frozen=True)
class SavedModule:
    """What a checkpoint saved of its LightningModule: its class, the arguments it was built with, its weights."""

    init_args: dict[str, Any]
    """The saved hyper-parameters: ``config`` and ``optim`` as dicts; ``lora`` and ``init_from`` for a LoRA run."""
    weights: Path
    """The sharded checkpoint directory, or the one-process Lightning ``.ckpt`` file holding a ``state_dict``."""
    layout: CheckpointLayout | None
    """How a sharded checkpoint was saved (``None`` for a ``.ckpt`` file, which records no layout)."""

    @property
    def module(self) -> str | None:
        """The module's class name (``GPT``, ``Bert``, ``T5``...) as ``layout.json`` records it; ``None`` for a
        ``.ckpt`` file, which does not record it."""
        return self.layout.module if self.layout is not None else None

    @property
    def lora(self) -> dict[str, Any] | None:
        """The saved LoRA settings (``LoRAConfig`` fields), ``None`` if the module has no adapters."""
        return self.init_args.get("lora") or None

    @property
    def base(self) -> str | None:
        """The checkpoint the weights this one lacks come from: the ``init_from`` of an adapters-only LoRA
        checkpoint (a ``.ckpt`` file holds every weight)."""
        if self.layout is None or not (self.lora or {}).get("adapters_only"):
            return None
        return self.init_args.get("init_from")


def read_saved_module(path: _PATH) -> SavedModule:
    """Read what a checkpoint saved of its module: a sharded directory's ``layout.json`` and ``trainer.pt``, or a
    one-process Lightning ``.ckpt`` file; a missing, incomplete or damaged file is a one-line error naming it."""
    path = Path(path)
    if path.is_file():
        state, layout = _lightning_file(path), None
    else:
        layout = read_layout(path)
        state = _load_file(path / TRAINER_FILE, _COPY_AGAIN)
    return SavedModule(dict(state.get("hyper_parameters") or {}), path, layout)


def load_lightning_file(chunks: Sequence[torch.nn.Module], path: _PATH) -> None:
    """Load a one-process Lightning ``.ckpt`` file's weights into one process's model chunks (any other layout
    does not fit: the file holds unsharded tensors).

    megatron's DDP saves its module's keys without its own prefix, which ``LightningModule.load_state_dict`` does
    not undo, so each chunk loads its share itself.
    """
    weights = _lightning_file(Path(path))["state_dict"]
    for index, chunk in enumerate(chunks):
        prefix = f"chunks.{index}."
        saved = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        problems = _state_mismatches(unwrap(chunk).state_dict(), saved)
        if problems:
            raise CheckpointError(
                f"{path} does not fit model chunk {index} ({len(problems)} tensor(s): {'; '.join(problems[:3])}): "
                f"load it into one process (tp 1, pp 1) with the model it was trained with (leave --config out to "
                f"use the one it saved)"
            )
        unwrap(chunk).load_state_dict(saved, strict=True)


def _state_mismatches(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """What keeps ``saved`` from loading strictly into a module whose state dict is ``expected``, one phrase each."""
    problems = [f"{key} is missing" for key in expected if key not in saved]
    problems += [f"{key} is not in the model" for key in saved if key not in expected]
    problems += [f"{key} has shape {tuple(saved[key].shape)}, the model {tuple(value.shape)}"
                 for key, value in expected.items() if isinstance(value, torch.Tensor) and key in saved
                 and isinstance(saved[key], torch.Tensor) and saved[key].shape != value.shape]
    return problems


def check_compatible(path: _PATH, saved: CheckpointLayout, current: CheckpointLayout, load_optimizer: bool) -> None:
    """Raise :class:`CheckpointError` if a checkpoint saved as ``saved`` cannot be loaded into a run laid out as
    ``current`` (dtype, optimizer format, model-parallel change under the distributed optimizer)."""
    if saved.params_dtype != current.params_dtype:
        raise CheckpointError(
            f"checkpoint {path} holds {saved.params_dtype} parameters but this run uses {current.params_dtype}; "
            f"set the Trainer's precision to the one it was trained with"
        )
    if not load_optimizer:
        return
    fix = ("or pass MegatronStrategy(ckpt_load_optimizer=False) to load the weights and training progress with a "
           "fresh optimizer state")
    if not saved.has_optimizer:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state (saved weights-only); {fix}")
    if saved.distributed_optimizer != current.distributed_optimizer:
        raise CheckpointError(
            f"checkpoint {path} was saved with use_distributed_optimizer={saved.distributed_optimizer}, this run "
            f"has {current.distributed_optimizer}; their optimizer states differ in format. Match the setting {fix}"
        )
    if saved.distributed_optimizer and saved.model_parallel != current.model_parallel:
        raise CheckpointError(
            f"checkpoint {path} was saved as {saved.describe()}; the distributed optimizer's state reshards across "
            f"data parallelism only, and this run is {current.describe()}. Use the saved TP/PP/VP/CP {fix}"
        )


def restore_chunks(chunks: Sequence[torch.nn.Module], loaded: Mapping[str, Any], strict: bool = True) -> None:
    """Copy a loaded model state (keyed as :func:`model_sharded_state_dict` keys it) into the model chunks."""
    names = ["model"] if len(chunks) == 1 else [f"model{index}" for index in range(len(chunks))]
    with torch.no_grad():
        for name, chunk in zip(names, chunks):
            unwrap(chunk).load_state_dict(loaded[name], strict=strict)


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state of all model chunks of this rank, keyed ``model`` (or ``model0``, ``model1``... with VP)."""
    models = [unwrap(chunk) for chunk in chunks]
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{index}": model.sharded_state_dict() for index, model in enumerate(models)}


def damaged_files(path: _PATH) -> list[str]:
    """Files of a checkpoint cut short (an interrupted copy, a full disk): shards shorter than the metadata says,
    unreadable ``.pt`` archives. Reads sizes and metadata only."""
    path = Path(path)
    problems = [f"{name} is truncated or corrupt" for name in ("common.pt", TRAINER_FILE)
                if (path / name).is_file() and not zipfile.is_zipfile(path / name)]
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception:  # noqa: BLE001 - any failure to read it means the same to the user
        return [*problems, ".metadata is truncated or corrupt"]
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            have = "is missing" if size is None else f"holds {size:,} bytes"
            problems.append(f"shard {name} {have}, the metadata expects {end:,}")
    return problems


def mismatches(path: _PATH, template: dict[str, Any]) -> list[str]:
    """Tensors this rank would load whose key or shape the checkpoint lacks, and LoRA adapters the checkpoint holds
    but ``template`` lacks (reads metadata only, no collective)."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    problems = []
    wanted = set()
    for _, tensor in sharded_tensors(template):
        wanted.add(tensor.key)
        stored = saved.get(tensor.key)
        if stored is None:
            problems.append(f"{tensor.key} is missing from the checkpoint")
        elif tuple(stored.global_shape) != tuple(tensor.global_shape):
            problems.append(f"{tensor.key} has shape {tuple(stored.global_shape)} in the checkpoint but "
                            f"{tuple(tensor.global_shape)} in the model")
    # Loading a LoRA checkpoint into a model without its adapters would silently drop what fine-tuning learned.
    problems += [f"the checkpoint holds the LoRA adapter {key}, which the model lacks (set model.init_args.lora)"
                 for key in sorted(saved)
                 if is_adapter(key) and not key.startswith("optimizer.") and key not in wanted][:1]
    return problems


def sharded_tensors(state: Any, name: str = "") -> Iterator[tuple[str, ShardedTensor]]:
    """Every ``ShardedTensor`` of a sharded state dict (factories built), with the state-dict name it sits under."""
    if isinstance(state, ShardedTensorFactory):
        yield from sharded_tensors(state.build(), name)
    elif isinstance(state, ShardedTensor):
        yield name, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from sharded_tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from sharded_tensors(value, name)


def raise_on_any_rank(problem: str | None, error: type[Exception] = CheckpointError) -> None:
    """Raise ``error`` on every rank if any rank found a problem, so that no rank enters a collective alone."""
    problems = [problem]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = [(rank, p) for rank, p in enumerate(problems) if p]
    if found:
        rank, text = found[0]
        raise error(f"rank {rank}: {text}")


class MegatronCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing megatron-core sharded checkpoints atomically, optionally in the background.

    ``save_checkpoint`` is called on every rank: the ``state_dict`` and ``optimizer_states`` entries must be sharded
    state dicts (what :class:`~lightning_megatron.strategy.MegatronStrategy` puts there), and ``layout`` a
    :class:`CheckpointLayout` as a dict; everything else is Lightning's state and is written by rank 0.
    """

    def __init__(self, async_save: bool = False, parallel_save: bool = True) -> None:
        self.async_save = async_save
        self.parallel_save = parallel_save
        self._queue: AsyncCallsQueue | None = None

    # ------------------------------------------------------------------ save
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write this rank's shards under ``<path>.partial`` and publish ``path`` once every rank has finished."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        self.finalize(blocking=True)  # one save in flight at a time: a newer one may replace the same path
        state = dict(checkpoint)
        layout = state.pop("layout")
        sharded = dict(state.pop("state_dict"))  # "model" (or "model0", "model1", ... with VP)
        if state.get("optimizer_states"):
            sharded["optimizer"] = state.pop("optimizer_states")
        state.pop("optimizer_states", None)
        path = Path(path)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        trainer_state = None
        if _rank() == 0:
            if partial.exists():
                shutil.rmtree(partial)  # a save that was killed before it finished
            partial.mkdir(parents=True)
            buffer = io.BytesIO()
            torch.save(state, buffer)  # now: training goes on while an async save is in flight
            trainer_state = buffer.getvalue()
        _barrier()
        request = dist_checkpointing.save(
            sharded, str(partial), sharded_strategy=self._save_strategy(), async_sharded_save=self.async_save
        )
        if self.async_save:
            request.add_finalize_fn(lambda: _publish(partial, path, layout, trainer_state))
            self._async_queue().schedule_async_request(request)
        else:
            _publish(partial, path, layout, trainer_state)

    def _save_strategy(self) -> Any:
        strategy = dist_checkpointing.serialization.get_default_save_sharded_strategy()
        if self.parallel_save and parallel_state.model_parallel_is_initialized():
            # Replicated tensors are written once, their writing split among the data-parallel ranks.
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelSaveStrategyWrapper(strategy, group)
        return strategy

    def _async_queue(self) -> AsyncCallsQueue:
        if self._queue is None:
            self._queue = AsyncCallsQueue()
        return self._queue

    def finalize(self, blocking: bool = False) -> None:
        """Publish the background saves that every rank has finished (all of them when ``blocking``); all ranks."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    # ------------------------------------------------------------------ load
    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None) -> dict[str, Any]:
        """Lightning's state of a checkpoint (no tensors): what ``trainer.pt`` holds, plus ``layout``."""
        layout = read_layout(path)
        damaged = damaged_files(path)
        if damaged:
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(damaged)}; copy it again or resume from "
                                  f"an earlier checkpoint")
        state = _load_file(Path(path) / TRAINER_FILE, _COPY_AGAIN)
        state["layout"] = layout.to_dict()
        return state

    def load_sharded(self, path: _PATH, template: dict[str, Any]) -> dict[str, Any]:
        """Load the tensors of ``template`` (a sharded state dict) from ``path``; every rank, after validation."""
        problem = None
        try:
            found = mismatches(path, template)
            if found:
                problem = (f"checkpoint {path} does not fit this model ({len(found)} tensor(s)): "
                           + "; ".join(found[:5]) + ". Build the model with the configuration it was saved with")
        except Exception as error:  # unreadable metadata on one rank must not leave the others in a collective
            problem = f"cannot read checkpoint metadata of {path}: {error}"
        raise_on_any_rank(problem)
        return dist_checkpointing.load(template, str(path))

    # ------------------------------------------------------------------ remove, teardown
    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete a checkpoint directory (call on one rank only)."""
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    @override
    def teardown(self) -> None:
        """Wait for and publish every background save."""
        self.finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()
            self._queue = None


_COPY_AGAIN = "copy the checkpoint again, or use an earlier one"


def _load_file(file: Path, fix: str, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file (``mmap``: its tensors read from disk only when used); a damaged file is a
    :class:`CheckpointError` naming it and ``fix`` rather than a pickle traceback."""
    # torch.save writes zip archives: a cut-short one lacks its central directory, random bytes lack the rest.
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"{file} is truncated or corrupt (not the zip archive torch.save writes); {fix}")
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{file} is truncated or corrupt ({str(error).splitlines()[0]}); {fix}") from None


def _lightning_file(path: Path) -> dict[str, Any]:
    """The dict a one-process Lightning ``.ckpt`` file holds (``state_dict``, ``hyper_parameters``...)."""
    # Mapped: reading the hyper-parameters beside a large state_dict does not read its tensors.
    state = _load_file(path, "copy it again, or save it again from the run that trained it", mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds no state_dict); pass a checkpoint "
                              f"directory saved by training or a Lightning .ckpt file")
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _publish(partial: Path, path: Path, layout: dict[str, Any], trainer_state: bytes | None) -> None:
    """Write rank 0's files into ``partial`` and rename it to ``path``; all ranks, once all shards are on disk."""
    _barrier()
    if _rank() == 0:
        assert trainer_state is not None
        (partial / TRAINER_FILE).write_bytes(trainer_state)
        with atomic_write(partial / LAYOUT_FILE) as tmp:
            tmp.write_text(json.dumps(layout, indent=2))
        if path.exists():
            # Directories cannot be renamed over each other: move the old one aside, publish, then delete it.
            old = path.with_name(path.name + ".replaced")
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)
            os.rename(partial, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(partial, path)
    _barrier()


__all__ = [
    "CheckpointError",
    "CheckpointLayout",
    "SavedModule",
    "check_compatible",
    "load_lightning_file",
    "MegatronCheckpointIO",
    "model_sharded_state_dict",
    "read_layout",
    "read_saved_module",
    "restore_chunks",
]
