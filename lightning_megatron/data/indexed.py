"""megatron-core's indexed dataset on disk (``<prefix>.bin`` + ``<prefix>.idx``): checks that name the bad file.

megatron-core reads these files with bare asserts (or reads past the end of a truncated ``.bin``); the checks here
run first, in every process, before any process group could hang, and say which file is wrong and how to fix it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, get_bin_path, get_idx_path

from lightning_megatron.errors import UserError

_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_READ_CHUNK = 1 << 24  # tokens per read when scanning a .bin (bounded memory whatever the file size)


@dataclass(frozen=True)
class IndexedFiles:
    """What a ``.bin/.idx`` pair holds, read from its index."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def _fix(prefix: str) -> str:
    return f"rebuild it with `lightning-megatron preprocess --output-prefix {prefix} ...`"


def inspect_indexed(prefix: str | os.PathLike) -> IndexedFiles:
    """Check that ``prefix.bin`` and ``prefix.idx`` exist, are intact and match; return what they hold."""
    prefix = str(prefix)
    idx_path, bin_path = Path(get_idx_path(prefix)), Path(get_bin_path(prefix))
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (data prefix {prefix!r}); {_fix(prefix)}")
    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as handle:
        header = handle.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or not header.startswith(_INDEX_HEADER):
        raise UserError(f"{idx_path} is not a megatron-core index file (bad or truncated header); {_fix(prefix)}")
    version, code, num_sequences, num_documents = struct.unpack("<QBQQ", header[len(_INDEX_HEADER) :])
    if version != 1:
        raise UserError(f"{idx_path} has index version {version}; only version 1 is supported")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise UserError(f"{idx_path} names an unknown token dtype code {code}; {_fix(prefix)}") from None
    expected_idx = _HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    if idx_size < expected_idx:
        raise UserError(
            f"{idx_path} is truncated: {idx_size} bytes, its header promises at least {expected_idx}; {_fix(prefix)}"
        )
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=_HEADER_BYTES, shape=(num_sequences,))
    num_tokens = int(lengths.sum(dtype=np.int64))
    del lengths
    bin_size, expected_bin = bin_path.stat().st_size, num_tokens * DType.size(dtype)
    if bin_size != expected_bin:
        state = "truncated" if bin_size < expected_bin else "longer than its index says"
        raise UserError(
            f"{bin_path} does not match {idx_path}: the index describes {num_tokens} tokens ({expected_bin} bytes) "
            f"but the .bin holds {bin_size} bytes ({state}); the two files come from different runs or one was cut "
            f"short: {_fix(prefix)}"
        )
    return IndexedFiles(prefix, dtype, num_sequences, max(0, num_documents - 1), num_tokens)


def max_token_id(prefix: str | os.PathLike) -> int:
    """The largest token id stored in ``prefix.bin`` (scanned in bounded-memory chunks); -1 for an empty file."""
    info = inspect_indexed(prefix)
    if info.num_tokens == 0:
        return -1
    tokens = np.memmap(get_bin_path(str(prefix)), dtype=info.dtype, mode="r", shape=(info.num_tokens,))
    return int(max(tokens[i : i + _READ_CHUNK].max() for i in range(0, info.num_tokens, _READ_CHUNK)))


def check_vocab_size(prefixes: Iterable[str | os.PathLike], vocab_size: int) -> None:
    """Raise if any dataset holds a token id the model's embedding (``vocab_size`` rows) cannot look up."""
    for prefix in prefixes:
        largest = max_token_id(prefix)
        if largest >= vocab_size:
            raise UserError(
                f"{get_bin_path(str(prefix))} holds token id {largest}, but the model's vocab_size is {vocab_size}: "
                f"the data was tokenised with a larger vocabulary. Set the model's vocab_size to at least "
                f"{largest + 1} (the tokenizer's vocabulary size), or preprocess with the model's tokenizer"
            )
