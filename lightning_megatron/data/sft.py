"""Supervised fine-tuning data: prompt/response pairs or chat messages, loss only on the responses.

Input: a ``.jsonl`` (or ``.jsonl.gz``) file, one example per line, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. Each message is rendered with
the template ``<|{role}|>\\n{content}\\n``, except that an assistant's content is followed by the end-of-document
token instead of the newline. Only assistant content and that end token are learned (``loss_mask`` 1); headers,
system and user text are context. Examples are padded one per sample, or packed several per sample
(``packed=True``: fewer wasted tokens; position ids restart per example, but attention is not blocked between
packed examples).
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_megatron.data.datamodule import MegatronDataModule
from lightning_megatron.data.samples import GPTSamples
from lightning_megatron.data.tokenizer import LazyTokenizer, Tokenizer
from lightning_megatron.errors import UserError

ROLES = ("system", "user", "assistant")


def read_conversations(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The examples of an SFT ``.jsonl`` file as message lists (prompt/response become user/assistant)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file {path} does not exist")
    conversations = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if "messages" in record:
                messages = record["messages"]
                bad = [m for m in messages if m.get("role") not in ROLES or not isinstance(m.get("content"), str)]
                if bad:
                    raise UserError(f"{path}:{number}: each message needs a role in {ROLES} and a string content")
            elif "prompt" in record and "response" in record:
                messages = [{"role": "user", "content": record["prompt"]},
                            {"role": "assistant", "content": record["response"]}]
            else:
                raise UserError(f"{path}:{number} needs 'prompt' and 'response', or 'messages'")
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{path}:{number} has no assistant message: nothing to learn")
            conversations.append(messages)
    if not conversations:
        raise UserError(f"SFT file {path} holds no examples")
    return conversations


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask per id) of one conversation rendered with the template above."""
    ids: list[int] = []
    mask: list[int] = []
    newline = tokenizer.encode("\n")
    for message in messages:
        header = tokenizer.encode(f"<|{message['role']}|>\n")
        content = tokenizer.encode(message["content"])
        learn = message["role"] == "assistant"
        tail = [tokenizer.eod] if learn else newline
        ids += header + content + tail
        mask += [0] * len(header) + [int(learn)] * (len(content) + len(tail))
    return ids, mask


def pack(examples: list[tuple[list[int], list[int]]], length: int) -> list[dict[str, np.ndarray]]:
    """Greedily pack examples, in order, into samples of at most ``length`` ids (position ids restart each one)."""
    samples: list[dict[str, np.ndarray]] = []
    current: list[tuple[list[int], list[int]]] = []
    used = 0
    for ids, mask in examples:
        if current and used + len(ids) > length:
            samples.append(_join(current))
            current, used = [], 0
        current.append((ids, mask))
        used += len(ids)
    if current:
        samples.append(_join(current))
    return samples


def _join(parts: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in parts]),
        "loss_mask": np.concatenate([np.asarray(mask, dtype=np.float32) for _, mask in parts]),
        "position_ids": np.concatenate([np.arange(len(ids)) for ids, _ in parts]),
    }


def sft_dataset(path: str | os.PathLike, tokenizer: Tokenizer, seq_length: int, packed: bool = False) -> Dataset:
    """GPT samples of an SFT file: each example truncated to ``seq_length + 1`` ids, then padded or packed."""
    examples = []
    dropped = 0
    for messages in read_conversations(path):
        ids, mask = encode_conversation(tokenizer, messages)
        ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        examples.append((ids, mask))
    if dropped:
        warnings.warn(f"{path}: {dropped} example(s) dropped: their response starts after {seq_length} tokens")
    if not examples:
        raise UserError(f"{path}: no example has a response within seq_length={seq_length} tokens")
    items = pack(examples, seq_length + 1) if packed else [
        {"input_ids": np.asarray(ids), "loss_mask": np.asarray(mask, dtype=np.float32)} for ids, mask in examples
    ]
    return GPTSamples(items, seq_length, pad_id=tokenizer.pad)


class SFTDataModule(MegatronDataModule, LazyTokenizer):
    """Fine-tuning data from an SFT ``.jsonl`` (see the module docs for the format), in the GPT batch contract.

    Validation uses ``val_path`` when given, else the last ``val_fraction`` of the training file's examples.
    """

    def __init__(self, path: str, val_path: str | None = None, val_fraction: float = 0.05, tokenizer: str | None = None,
                 seq_length: int = 512, packed: bool = False, **kwargs: Any) -> None:
        """``kwargs`` are :class:`MegatronDataModule`'s (batch sizes, seed, workers, ramp-up)."""
        super().__init__(**kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path, self.val_path, self.val_fraction = path, val_path, val_fraction
        self.tokenizer_spec = tokenizer
        self.seq_length = seq_length
        self.packed = packed

    def data_description(self) -> str:
        return f"{self.path}" + (f" / {self.val_path}" if self.val_path else f" (val_fraction={self.val_fraction})")

    def setup(self, stage: str) -> None:
        tokenizer = self.tokenizer
        data = sft_dataset(self.path, tokenizer, self.seq_length, self.packed)
        if self.val_path:
            self.train_dataset, self.val_dataset = data, sft_dataset(self.val_path, tokenizer, self.seq_length,
                                                                     self.packed)
        else:
            held_out = int(len(data) * self.val_fraction)
            items = data.dataset
            self.train_dataset = GPTSamples(items[: len(items) - held_out], self.seq_length, tokenizer.pad)
            self.val_dataset = GPTSamples(items[len(items) - held_out :], self.seq_length, tokenizer.pad)
        self.test_dataset = self.val_dataset
