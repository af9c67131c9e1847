"""The bundled public-domain corpus and readers for text corpora (jsonl, jsonl.gz, plain text)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from lightning_megatron.errors import UserError

BUNDLED_CORPUS = Path(__file__).with_name("corpus") / "kjv.jsonl.gz"
"""The King James Bible, one document per chapter (see corpus/README.md for source and licence)."""


def read_texts(path: str | os.PathLike, json_key: str = "text") -> Iterator[str]:
    """Yield the documents of a ``.jsonl``/``.jsonl.gz`` file (field ``json_key``) or of a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    is_json = ".jsonl" in path.suffixes or ".json" in path.suffixes
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            if not is_json:
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number} is not valid JSON ({error.msg})") from None
            if json_key not in record:
                raise UserError(f"{path}:{line_number} has no field {json_key!r}; pass the right json_key")
            yield record[json_key]
