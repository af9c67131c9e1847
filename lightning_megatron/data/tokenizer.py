"""Tokenizers: any Hugging Face ``tokenizers`` file or directory, and the bundled corpus's own BPE tokenizer.

megatron-core's datasets need a tokenizer with ``eod``, ``pad`` and ``unique_identifiers`` (their index caches are
keyed on it); :class:`Tokenizer` provides them over a Hugging Face tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lightning_megatron.atomic import atomic_write
from lightning_megatron.errors import UserError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
"""Beginning-of-sequence tokens of common tokenizers (Llama 2, Llama 3, Gemma), looked up in this order."""
BUNDLED_VOCAB_SIZE = 4096


def cache_dir() -> Path:
    """Where derived artefacts (the bundled tokenizer, tokenised corpora) are cached."""
    root = os.environ.get("LIGHTNING_MEGATRON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lightning_megatron"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Tokenizer:
    """A Hugging Face tokenizer with the attributes megatron-core's datasets and our generation expect."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {path}: pass a tokenizer.json file or a Hugging Face tokenizer directory holding one"
            )
        self.path = file
        self._tokenizer = HFTokenizer.from_file(str(file))
        # A tokenizer.json keeps the padding and truncation it was last used with (a BERT's 128, say); training
        # data and evaluation need exactly the tokenizer's ids, whatever their number.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        eod = self._find_token((EOD_TOKEN, "</s>", "[SEP]", "<eos>", "<|end_of_text|>"))
        if eod is None:
            raise UserError(f"tokenizer {file} has no end-of-document token (looked for {EOD_TOKEN}, </s>, [SEP]); "
                            f"use a tokenizer with one of them")
        self.eod: int = eod
        pad = self._find_token((PAD_TOKEN, "<pad>", "[PAD]"))
        self.pad: int = eod if pad is None else pad
        self.bos: int | None = self._find_token(BOS_TOKENS)
        """The beginning-of-sequence token, if the tokenizer has one (the bundled one does not)."""
        self.unique_identifiers = {"class": "Tokenizer", "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}

    def _find_token(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        """The number of token ids, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        """Alias of :attr:`eod` under Hugging Face's name."""
        return self.eod

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, special tokens dropped unless ``skip_special_tokens`` is false."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Same as :meth:`encode` (the name megatron-core's tokenizer protocol uses)."""
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Same as :meth:`decode` (the name megatron-core's tokenizer protocol uses)."""
        return self.decode(ids)


def train_bpe(texts: Iterable[str], vocab_size: int, output: str | os.PathLike) -> Path:
    """Train a byte-level BPE tokenizer with ``EOD_TOKEN``/``PAD_TOKEN`` and write it atomically to ``output``."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    with atomic_write(output) as tmp:
        tokenizer.save(str(tmp))
    return Path(output)


def bundled_tokenizer() -> Tokenizer:
    """The BPE tokenizer of the bundled corpus, trained on first use and cached (a few seconds)."""
    from lightning_megatron.data.corpus import BUNDLED_CORPUS, read_texts

    digest = hashlib.sha256(BUNDLED_CORPUS.read_bytes()).hexdigest()[:12]
    path = cache_dir() / f"tokenizer-{digest}-{BUNDLED_VOCAB_SIZE}.json"
    if not path.is_file():
        train_bpe(read_texts(BUNDLED_CORPUS), BUNDLED_VOCAB_SIZE, path)
    return Tokenizer(path)


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None`` or ``"bundled"`` for the bundled tokenizer, else a tokenizer.json path or a HF tokenizer directory."""
    if spec in (None, "", "bundled"):
        return bundled_tokenizer()
    return Tokenizer(spec)


class LazyTokenizer:
    """Mixin for datamodules: :attr:`tokenizer`, loaded from :attr:`tokenizer_spec` on first use."""

    tokenizer_spec: str | None
    """A tokenizer.json path or HF tokenizer directory; ``None`` or ``"bundled"`` for the bundled tokenizer."""

    def load_tokenizer(self, spec: str | None) -> Tokenizer:
        """The tokenizer for ``spec``; datamodules that need a special kind of tokenizer override it."""
        return load_tokenizer(spec)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the data is encoded with."""
        return self.load_tokenizer(self.tokenizer_spec)
