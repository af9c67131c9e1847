"""``lightning-megatron preprocess``: tokenise a corpus into megatron-core's ``.bin/.idx`` indexed dataset.

Documents stream from the inputs (``.jsonl``/``.jsonl.gz``, ``.parquet`` when pyarrow is installed, plain text
one document per line or per file, or directories of those) in chunks to a pool of tokenizer processes; the results
come back in order and are appended to megatron-core's ``IndexedDatasetBuilder``. At most ``4 × workers`` chunks
are in flight, so memory stays flat however large the corpus (only the index, a few bytes per sequence, grows).
The files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
from tqdm import tqdm

from lightning_megatron.data.corpus import read_texts
from lightning_megatron.data.tokenizer import Tokenizer, load_tokenizer
from lightning_megatron.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")

# A deliberately simple splitter (nltk's punkt is not available offline): a sentence ends at . ! or ?, optionally
# followed by closing quotes or brackets, when whitespace and then a capital letter, digit or opening quote follow.
# It splits after abbreviations such as "Mr." too; pre-split your text if that matters.
_SENTENCE_END = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with the simple punctuation rule above (blank results dropped)."""
    pieces = _SENTENCE_END.sub(lambda match: match.group(1) + "\x00", text).split("\x00")
    return [piece.strip() for piece in pieces if piece.strip()]


@dataclass
class PreprocessConfig:
    """What to tokenise and how; see ``lightning-megatron preprocess --help`` for each field."""

    inputs: list[str]
    output_prefix: str
    tokenizer: str | None = None
    json_key: str = "text"
    append_eod: bool = False
    split_sentences: bool = False
    text_mode: Literal["line", "file"] = "line"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    chunk_size: int = 64


@dataclass
class PreprocessSummary:
    """Counts and timings of one preprocessing run."""

    output_prefix: str
    workers: int
    documents: int
    skipped_documents: int
    sequences: int
    tokens: int
    seconds: float
    bin_bytes: int

    @property
    def documents_per_second(self) -> float:
        """Documents written per second of wall time."""
        return self.documents / max(self.seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        """Tokens written per second of wall time."""
        return self.tokens / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (
            f"wrote {self.output_prefix}.bin/.idx: {self.documents:,} documents, {self.sequences:,} sequences, "
            f"{self.tokens:,} tokens ({self.bin_bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s with "
            f"{self.workers} worker(s): {self.documents_per_second:,.0f} documents/s, "
            f"{self.tokens_per_second:,.0f} tokens/s; {self.skipped_documents} empty document(s) skipped"
        )


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named by ``inputs`` (files, or directories searched recursively for supported files), in order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
            if not found:
                raise FileNotFoundError(f"{path} holds no .jsonl, .jsonl.gz, .parquet or .txt files")
            files.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise UserError(f"{path}: unsupported input type; use .jsonl[.gz], .parquet or .txt[.gz]")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def _kind(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in JSON_SUFFIXES:
        return "json"
    if last == ".parquet":
        return "parquet"
    if last in TEXT_SUFFIXES:
        return "text"
    return None


def read_documents(files: Iterable[Path], json_key: str = "text", text_mode: str = "line") -> Iterator[str]:
    """Stream the documents of ``files``: a JSON field, a parquet column, or text lines (or whole text files)."""
    if text_mode not in ("line", "file"):
        raise UserError(f"text_mode must be 'line' or 'file', got {text_mode!r}")
    for path in files:
        kind = _kind(path)
        if kind == "parquet":
            yield from _read_parquet(path, json_key)
        elif kind == "text" and text_mode == "file":
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as handle:
                yield handle.read()
        else:
            yield from read_texts(path, json_key)


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow: pip install 'lightning-megatron[parquet]' (or pip install pyarrow)"
        ) from None
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise KeyError(f"{path} has no column {column!r} (columns: {parquet.schema_arrow.names}); pass --json-key")
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text)


_worker: dict = {}  # this worker process's tokenizer and options, set once by _init_worker


def _init_worker(tokenizer_path: str, append_eod: bool, sentences: bool) -> None:
    # Each worker is one process; Rust-side threads on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=Tokenizer(tokenizer_path), append_eod=append_eod, sentences=sentences)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    """Tokenise a chunk of documents: (all tokens concatenated, per document its sequence lengths; [] = empty)."""
    tokenizer: Tokenizer = _worker["tokenizer"]
    pieces = [split_sentences(text) if _worker["sentences"] else [text] for text in texts]
    encoded = tokenizer.encode_batch([piece for doc in pieces for piece in doc])
    flat: list[int] = []
    lengths: list[list[int]] = []
    position = 0
    for doc in pieces:
        sequences = [ids for ids in encoded[position : position + len(doc)] if ids]
        position += len(doc)
        if sequences and _worker["append_eod"]:
            sequences[-1] = [*sequences[-1], tokenizer.eod]
        for ids in sequences:
            flat.extend(ids)
        lengths.append([len(ids) for ids in sequences])
    return np.asarray(flat, dtype=np.int64), lengths


def _chunks(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(documents, size)):
        yield chunk


def preprocess(config: PreprocessConfig, progress: bool = True) -> PreprocessSummary:
    """Tokenise ``config.inputs`` into ``config.output_prefix``.bin/.idx with ``config.workers`` processes."""
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if config.workers < 1 or config.chunk_size < 1:
        raise UserError(f"workers and chunk_size must be >= 1, got {config.workers} and {config.chunk_size}")
    files = expand_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    output = Path(config.output_prefix)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    counts = {"documents": 0, "skipped": 0, "sequences": 0, "tokens": 0}
    start = time.perf_counter()
    bar = tqdm(unit=" docs", desc=f"tokenising -> {output.name}", disable=not progress, dynamic_ncols=True)

    def write(result: tuple[np.ndarray, list[list[int]]]) -> None:
        flat, per_document = result
        offset = 0
        for lengths in per_document:
            if not lengths:
                counts["skipped"] += 1
                continue
            size = sum(lengths)
            builder.add_document(flat[offset : offset + size], lengths)
            offset += size
            counts["documents"] += 1
            counts["sequences"] += len(lengths)
            counts["tokens"] += size
        bar.update(len(per_document))
        bar.set_postfix_str(f"{counts['tokens'] / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s", False)

    try:
        documents = read_documents(files, config.json_key, config.text_mode)
        init_args = (str(tokenizer.path), config.append_eod, config.split_sentences)
        with multiprocessing.Pool(config.workers, initializer=_init_worker, initargs=init_args) as pool:
            pending: deque = deque()
            for chunk in _chunks(documents, config.chunk_size):
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                if len(pending) >= 4 * config.workers:
                    write(pending.popleft().get())
            while pending:
                write(pending.popleft().get())
        bar.close()
        if counts["documents"] == 0:
            raise UserError(
                f"no non-empty documents in {', '.join(map(str, files))} (json key {config.json_key!r}); "
                f"nothing written"
            )
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{output}.bin")
        os.replace(f"{tmp}.idx", f"{output}.idx")
    except BaseException:
        bar.close()
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    return PreprocessSummary(
        output_prefix=str(output),
        workers=config.workers,
        documents=counts["documents"],
        skipped_documents=counts["skipped"],
        sequences=counts["sequences"],
        tokens=counts["tokens"],
        seconds=time.perf_counter() - start,
        bin_bytes=Path(f"{output}.bin").stat().st_size,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``lightning-megatron preprocess``."""
    parser = argparse.ArgumentParser(
        prog="lightning-megatron preprocess",
        description="Tokenise a corpus into megatron-core's indexed dataset (<output-prefix>.bin and .idx).",
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="files or directories: .jsonl[.gz], .parquet (needs pyarrow), .txt[.gz]")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--tokenizer", default="bundled",
                        help="a tokenizer.json, a Hugging Face tokenizer directory, or 'bundled' (default)")
    parser.add_argument("--json-key", default="text", help="the JSON field / parquet column holding the text")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    parser.add_argument("--split-sentences", action="store_true",
                        help="store each sentence as its own sequence (simple punctuation rule; needed for BERT/T5)")
    parser.add_argument("--text-mode", choices=("line", "file"), default="line",
                        help="plain-text inputs: one document per line (default) or per file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--chunk-size", type=int, default=64, help="documents per task sent to a worker")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``preprocess`` tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        append_eod=args.append_eod,
        split_sentences=args.split_sentences,
        text_mode=args.text_mode,
        workers=args.workers,
        chunk_size=args.chunk_size,
    )
    try:
        summary = preprocess(config, progress=not args.quiet)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
        print(f"error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        return 2
    print(summary)
    return 0
