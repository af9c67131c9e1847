"""The shared machinery of HF conversion: tensor rules, reading and writing sharded safetensors directories.

Three forms of the same weights meet here:

* **HF**: a ``save_pretrained`` directory (``config.json``, ``*.safetensors`` with an optional index, tokenizer).
* **consolidated**: full, unsharded tensors under the megatron-core names of a TP=1/PP=1 model
  (see :mod:`lightning_megatron.convert.consolidated`). Each architecture module (``gpt2.py``, ``llama.py``, ...)
  maps HF tensors to these and back with a list of :class:`Rule`; a rule needs only its own few tensors, so
  conversions stream tensor by tensor.
* **a live module** of any TP/PP layout, built by :func:`build_module`:
  :func:`~lightning_megatron.convert.consolidated.load_consolidated` cuts its shards out of consolidated tensors,
  :func:`~lightning_megatron.convert.consolidated.gather_consolidated` joins them back on rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lightning_megatron import parallel
from lightning_megatron.convert.consolidated import SafetensorsFiles, TensorSource
from lightning_megatron.errors import UserError
from lightning_megatron.module import MegatronModule
from lightning_megatron.parallel import ParallelConfig
from lightning_megatron.precision import MegatronPrecision
from lightning_megatron.strategy import RecomputeConfig, transformer_fields


class ConversionError(UserError):
    """A checkpoint or config that cannot be converted; the message names the tensor or field at fault."""


def _one(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _tuple(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclass(frozen=True)
class Rule:
    """One consolidated megatron tensor, the HF tensors it is made of, and the two functions between them."""

    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[..., torch.Tensor] = _one
    """Takes the HF tensors (in the order of :attr:`hf`) and returns the megatron tensor."""
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _tuple
    """Takes the megatron tensor and returns the HF tensors (in the order of :attr:`hf`)."""


def supported(hf: Mapping[str, Any], key: str, default: str, choices: Mapping[str, str], model: str) -> str:
    """Our value for an HF config field that converts only for some values (``choices``: HF value -> ours)."""
    value = hf.get(key, default)
    if value not in choices:
        raise ConversionError(f"{model} {key}={value!r} is not supported; supported: {sorted(choices)}")
    return choices[value]


def same(megatron: str, hf: str) -> Rule:
    """A tensor stored identically under two names."""
    return Rule(megatron, (hf,))


def transposed(megatron: str, hf: str) -> Rule:
    """A weight that HF stores transposed (GPT-2's ``Conv1D``)."""
    return Rule(megatron, (hf,), lambda w: w.t().contiguous(), lambda w: (w.t().contiguous(),))


def fused_qkv(megatron: str, q: str, k: str, v: str, heads: int, groups: int, transpose: bool = False) -> Rule:
    """Megatron's fused QKV (per query group: its query heads, then one key and one value head) from q, k and v.

    Weights are ``[out, in]`` (biases ``[out]``); ``transpose`` reads and writes HF's ``[in, out]`` Conv1D form.
    """

    def join(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
        if transpose:
            wq, wk, wv = wq.t(), wk.t(), wv.t()
        rest = wq.shape[1:]
        q_ = wq.reshape(groups, heads // groups, -1, *rest)
        k_ = wk.reshape(groups, 1, -1, *rest)
        v_ = wv.reshape(groups, 1, -1, *rest)
        if q_.shape[2] != k_.shape[2] or k_.shape[2] != v_.shape[2]:
            raise ConversionError(f"{megatron}: query, key and value head sizes differ ({q}, {k}, {v})")
        return torch.cat([q_, k_, v_], dim=1).reshape(-1, *rest).contiguous()

    def split(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = w.shape[1:]
        per_group = w.reshape(groups, heads // groups + 2, -1, *rest)
        q_ = per_group[:, : heads // groups].reshape(-1, *rest)
        k_ = per_group[:, -2].reshape(-1, *rest)
        v_ = per_group[:, -1].reshape(-1, *rest)
        parts = (q_, k_, v_)
        return tuple((p.t() if transpose else p).contiguous() for p in parts)

    return Rule(megatron, (q, k, v), join, split)


def concatenated(megatron: str, hf: tuple[str, ...], dim: int = 0) -> Rule:
    """HF tensors concatenated along ``dim`` (a gated MLP's ``[gate; up]``), in the order given."""

    def split(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.contiguous() for p in w.chunk(len(hf), dim=dim))

    return Rule(megatron, hf, lambda *ts: torch.cat(ts, dim=dim), split)


class Architecture(ABC):
    """How one family of HF models maps onto one of our modules; subclasses live in one module each."""

    name: str
    """Our short name (``gpt2``, ``llama``, ...), stored in converted checkpoints."""
    hf_architectures: tuple[str, ...]
    """HF ``config.architectures`` entries this mapping reads."""
    ignored_hf: tuple[str, ...] = ()
    """Suffixes of HF tensors that carry no weights (buffers some versions save)."""

    @abstractmethod
    def config_from_hf(self, hf: Mapping[str, Any]) -> Any:
        """Our model config from an HF ``config.json`` dict; raises :class:`ConversionError` for what we lack."""

    def config_for_weights(self, config: Any, names: Collection[str]) -> Any:
        """``config`` with the optional parts that tensors ``names`` hold or lack (a config.json that does not
        say whether a ``BertModel`` has its pooler); HF and megatron names alike."""
        return config

    @abstractmethod
    def config_to_hf(self, config: Any) -> dict[str, Any]:
        """The HF ``config.json`` dict of our model config."""

    @abstractmethod
    def rules(self, config: Any) -> list[Rule]:
        """Every consolidated tensor of the model, with its HF counterparts."""

    @abstractmethod
    def module(self, config: Any) -> MegatronModule:
        """An (unbuilt) module of this architecture."""

    def matches(self, module: MegatronModule) -> bool:
        """Whether a live module is of this architecture (used to export it)."""
        return False

    def check_layout(self, config: Any, layout: ParallelConfig) -> None:
        """Raise :class:`ConversionError` if ``config`` cannot be split over ``layout``."""
        try:
            layout.validate_model(config.num_layers, config.num_attention_heads,
                                  getattr(config, "num_query_groups", None))
        except parallel.LayoutError as error:
            raise ConversionError(str(error)) from None


class ShardedWriter:
    """Writes tensors into size-limited safetensors shards with an HF index, atomically (temp dir, then rename)."""

    def __init__(self, out: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()):
            raise ConversionError(f"{self.out} exists and is not empty; choose a new output directory")
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a shard is written whenever the queue reaches the size limit."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self._pending, self.tmp / f"shard-{len(self._shards)}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def files_dir(self) -> Path:
        """The directory to put other files (config, tokenizer) in before :meth:`finish`."""
        return self.tmp

    def finish(self) -> Path:
        """Write the last shard and the index, then move the directory into place."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for index, names in enumerate(self._shards):
            final = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp / f"shard-{index}.safetensors", self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return self.out


class Converted(TensorSource):
    """Consolidated tensors computed on demand from an HF source: each ``get`` reads only that tensor's inputs."""

    def __init__(self, rules: Iterable[Rule], source: SafetensorsFiles, ignored: tuple[str, ...] = ()) -> None:
        self.names = self.rules = {rule.megatron: rule for rule in rules}
        self.source = source
        missing = [name for rule in self.rules.values() for name in rule.hf if name not in source]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ConversionError(
                f"{source.path} lacks {len(missing)} tensor(s) the config calls for: {shown}; the checkpoint is "
                f"incomplete or its config.json does not describe it (layer count, tied embeddings, biases)"
            )
        used = {name for rule in self.rules.values() for name in rule.hf}
        extra = [n for n in source.keys() if n not in used and not n.endswith(ignored)]
        if extra:
            raise ConversionError(
                f"{source.path} holds {len(extra)} tensor(s) no rule uses: {', '.join(extra[:8])}; its config.json "
                f"does not describe the weights (e.g. fewer layers than stored) or the model has parts we do not "
                f"convert"
            )

    def get(self, name: str) -> torch.Tensor:
        """Build one consolidated tensor from its HF inputs."""
        rule = self.rules[name]
        return rule.to_megatron(*(self.source.get(n) for n in rule.hf))


def hf_tensors(rules: Iterable[Rule], source: TensorSource, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from a consolidated source, one rule at a time."""
    rules = list(rules)
    for rule in tqdm(rules, desc="to HF", unit="tensor", disable=not progress):
        yield from zip(rule.hf, rule.to_hf(source.get(rule.megatron)))


def build_module(module: MegatronModule, layout: ParallelConfig, precision: str = "32-true",
                 recompute: RecomputeConfig | None = None, device: torch.device | str = "cpu") -> MegatronModule:
    """Build this rank's chunks of ``module`` for ``layout`` outside a Trainer (megatron's state must be set up).

    The chunks get exactly the ``TransformerConfig`` fields a :class:`~lightning_megatron.MegatronStrategy` of the
    same layout, precision, recomputation and device would give them.
    """
    module.build(transformer_fields(layout, MegatronPrecision(precision), recompute or RecomputeConfig(),
                                    torch.device(device)))
    return module
