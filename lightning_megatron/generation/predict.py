"""``trainer.predict`` over a prompts file: a datamodule of prompts and a callback writing completions as jsonl.

Each line of a ``.jsonl`` prompts file is ``{"prompt": "...", ...}`` where any other key is a
:class:`~lightning_megatron.generation.SamplingParams` field for that prompt (``max_new_tokens``, ``temperature``,
``stop``, ...); a ``.txt`` file holds one prompt per line. Every data-parallel replica generates its share;
:class:`CompletionsWriter` gathers them on rank 0 and writes them in file order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from lightning_megatron.atomic import atomic_write
from lightning_megatron.data.tokenizer import LazyTokenizer
from lightning_megatron.errors import UserError
from lightning_megatron.generation import generate
from lightning_megatron.generation.requests import GenerationOutput
from lightning_megatron.generation.params import SamplingParams

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def read_prompts(path: str | os.PathLike, defaults: SamplingParams) -> list[dict[str, Any]]:
    """``[{"id", "prompt", "params"}]`` from a ``.jsonl`` or ``.txt`` prompts file (errors name the bad line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number} is not valid JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f'{path}:{number} needs a "prompt" string')
            unknown = set(record) - _PARAM_FIELDS - {"prompt", "id"}
            if unknown:
                raise UserError(f"{path}:{number} has unknown keys {sorted(unknown)}; use SamplingParams fields")
            params = defaults.replace(**{k: v for k, v in record.items() if k in _PARAM_FIELDS})
            try:
                params.validate()
            except ValueError as error:
                raise UserError(f"{path}:{number}: {error}") from None
            items.append({"id": record.get("id", len(items)), "prompt": record["prompt"], "params": params})
        else:
            items.append({"id": len(items), "prompt": line, "params": defaults})
    if not items:
        raise UserError(f"{path} holds no prompts")
    return items


class _Prompts(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class PromptsDataModule(pl.LightningDataModule, LazyTokenizer):
    """Prompts for ``trainer.predict`` from a file (``path``) or a list (``prompts``), ``batch_size`` at a time.

    Batches are lists of ``{"id", "prompt", "params"}``; ``params`` are the defaults a file's lines override.
    The model's ``predict_step`` hands each batch to :meth:`predict`, which completes it.
    """

    def __init__(self, path: str | None = None, tokenizer: str | None = None, batch_size: int = 8,
                 params: SamplingParams | None = None, prompts: list[str] | None = None) -> None:
        super().__init__()
        if (path is None) == (prompts is None):
            raise UserError("give PromptsDataModule either a prompts file (path) or a list of prompts")
        self.path = path
        self.prompts = prompts
        self.tokenizer_spec = tokenizer
        self.batch_size = batch_size
        self.params = params or SamplingParams()

    def predict_dataloader(self) -> DataLoader:
        if self.path is not None:
            items = read_prompts(self.path, self.params)
        else:
            items = [{"id": i, "prompt": p, "params": self.params} for i, p in enumerate(self.prompts or [])]
        return DataLoader(_Prompts(items), batch_size=self.batch_size, collate_fn=list)

    def predict(self, model: Any, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Complete a batch of prompts with ``model`` (every rank of the replica together); one record per prompt."""
        outputs = generate(model, [item["prompt"] for item in batch], [item["params"] for item in batch],
                           tokenizer=self.tokenizer)
        return [completion_record(item["id"], item["prompt"], output) for item, output in zip(batch, outputs)]


def completion_record(request_id: Any, prompt: str, output: GenerationOutput) -> dict[str, Any]:
    """The jsonl record of one completion."""
    record = {"id": request_id, "prompt": prompt, "completion": output.text, "tokens": output.tokens,
              "finish_reason": output.finish_reason, "cumulative_logprob": output.cumulative_logprob}
    if output.logprobs is not None:
        record["logprobs"] = output.logprobs
    return record


class CompletionsWriter(pl.Callback):
    """Writes every predicted completion to ``path`` (jsonl, in prompt order) on rank 0, atomically."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self._records: list[dict[str, Any]] = []

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._records.extend(outputs)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gathered = [self._records]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._records)
        if not trainer.is_global_zero:
            return
        unique = {record["id"]: record for records in gathered for record in records}
        order = sorted(unique, key=lambda key: (str(type(key)), key))
        with atomic_write(self.path) as tmp, open(tmp, "w") as handle:
            for key in order:
                handle.write(json.dumps(unique[key]) + "\n")
