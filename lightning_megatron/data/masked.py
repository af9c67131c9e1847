"""Masked-language-model data for BERT and T5: megatron-core's masked WordPiece datasets and their tokenizer.

Preprocess with sentences kept apart and no end-of-document token (the datasets assemble samples from sentences):
``lightning-megatron preprocess --input corpus.jsonl --tokenizer wordpiece.json --split-sentences --output-prefix
data/corpus``. The tokenizer must be a WordPiece one (``##`` continuation pieces, for whole-word masking) with
``[PAD]`` as id 0 and ``[CLS]``, ``[SEP]``, ``[MASK]``; T5 also needs sentinel tokens ``<extra_id_N>`` and uses
``[BOS]``/``[EOS]`` when present (else ``[CLS]``/``[SEP]``). :func:`train_wordpiece` makes one from any texts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset, T5MaskedWordPieceDatasetConfig
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lightning_megatron.atomic import atomic_write
from lightning_megatron.data.megatron_datasets import IndexedDataModule
from lightning_megatron.data.tokenizer import Tokenizer
from lightning_megatron.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def train_wordpiece(texts: Iterable[str], vocab_size: int, output: str | os.PathLike, num_sentinels: int = 100) -> Path:
    """Train a lower-cased WordPiece tokenizer (BERT-style, ``[PAD]`` = 0, T5 sentinels) and write it atomically."""
    tokenizer = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    sentinels = [f"<extra_id_{i}>" for i in range(num_sentinels)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + sentinels, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    with atomic_write(output) as tmp:
        tokenizer.save(str(tmp))
    return Path(output)


class MaskedLMTokenizer(Tokenizer):
    """A WordPiece tokenizer with the attributes megatron-core's BERT/T5 datasets read (cls, sep, mask, sentinels)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        missing = [token for token in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if token not in vocab]
        if missing:
            raise UserError(f"tokenizer {self.path} lacks {missing}: BERT/T5 data needs a WordPiece tokenizer with them")
        if vocab["[PAD]"] != 0:
            raise UserError(
                f"tokenizer {self.path} has [PAD] = {vocab['[PAD]']}; megatron-core's masked datasets write padding "
                f"as id 0 and mark it by the pad id, so [PAD] must be id 0"
            )
        self.pad = vocab["[PAD]"]
        self.cls: int = vocab["[CLS]"]
        self.sep: int = vocab["[SEP]"]
        self.mask: int = vocab["[MASK]"]
        self.bos: int = vocab.get("[BOS]", self.cls)
        self.eos: int = vocab.get("[EOS]", self.sep)
        self.vocab: dict[str, int] = vocab
        self.inv_vocab: dict[int, str] = {index: token for token, index in vocab.items()}
        sentinels = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := _SENTINEL.fullmatch(t)))
        self.additional_special_tokens_ids: list[int] = [index for _, index in sentinels]
        self.unique_identifiers["class"] = "MaskedLMTokenizer"


class _MaskedDataModule(IndexedDataModule):
    """Shared masking options of the BERT and T5 datamodules (megatron-core's MaskedWordPieceDatasetConfig)."""

    needs_sample_counts = True
    split_by_documents = True

    def __init__(
        self,
        paths: str | list[str],
        tokenizer: str,
        *,
        seq_length: int = 512,
        masking_probability: float = 0.15,
        short_sequence_probability: float = 0.1,
        masking_max_ngram: int = 3,
        masking_do_full_word: bool = True,
        masking_do_permutation: bool = False,
        masking_use_longer_ngrams: bool = False,
        masking_use_geometric_distribution: bool = False,
        **kwargs: Any,
    ) -> None:
        """``kwargs`` are :class:`IndexedDataModule`'s (``split``, batch sizes, ``num_samples``, ...)."""
        super().__init__(paths=paths, tokenizer=tokenizer, seq_length=seq_length, **kwargs)
        self.masking = dict(
            masking_probability=masking_probability,
            short_sequence_probability=short_sequence_probability,
            masking_max_ngram=masking_max_ngram,
            masking_do_full_word=masking_do_full_word,
            masking_do_permutation=masking_do_permutation,
            masking_use_longer_ngrams=masking_use_longer_ngrams,
            masking_use_geometric_distribution=masking_use_geometric_distribution,
        )

    def load_tokenizer(self, spec: str | None) -> MaskedLMTokenizer:
        if spec in (None, "", "bundled"):
            raise UserError("BERT/T5 data needs a WordPiece tokenizer: pass data.tokenizer=<tokenizer.json>")
        return MaskedLMTokenizer(spec)


class MegatronBERTDataModule(_MaskedDataModule):
    """BERT samples (megatron-core's ``BERTMaskedWordPieceDataset``), keys as megatron-core produces them.

    Each sample: ``text`` (token ids, ``[CLS] A [SEP] B [SEP]`` with masking applied, padded with 0), ``types``
    (0 for segment A, 1 for B), ``labels`` (original id at masked positions, -1 elsewhere), ``loss_mask`` (1 at
    masked positions), ``padding_mask`` (1 for real tokens, 0 for padding), ``is_random`` (1 when B is a random
    segment: the next-sentence label), ``truncated``. ``classification_head=False`` keeps segments in order
    (no next-sentence task).
    """

    def __init__(self, paths: str | list[str], tokenizer: str, *, classification_head: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(paths=paths, tokenizer=tokenizer, **kwargs)
        self.classification_head = classification_head

    def dataset_class(self) -> type:
        return BERTMaskedWordPieceDataset

    def dataset_config(self, **common: Any) -> BERTMaskedWordPieceDatasetConfig:
        return BERTMaskedWordPieceDatasetConfig(
            **common, **self.masking, classification_head=self.classification_head
        )


class MegatronT5DataModule(_MaskedDataModule):
    """T5 span-corruption samples (megatron-core's ``T5MaskedWordPieceDataset``), keys as megatron-core produces.

    Each sample: ``text_enc`` (encoder ids, ``seq_length``, masked spans replaced by sentinels, padded with 0),
    ``text_dec`` (decoder input ``[BOS] <extra_id_0> span ...``, ``seq_length_decoder``), ``labels`` (decoder
    targets, ending with ``[EOS]``, -1 where ``loss_mask`` is 0), ``loss_mask``, ``enc_mask`` and
    ``dec_mask`` (1 for real tokens, 0 for padding), ``truncated``. Defaults follow T5: spans up to 10 words with
    geometric lengths.
    """

    def __init__(self, paths: str | list[str], tokenizer: str, *, seq_length_decoder: int = 128,
                 masking_max_ngram: int = 10, masking_use_geometric_distribution: bool = True, **kwargs: Any) -> None:
        super().__init__(
            paths=paths, tokenizer=tokenizer, masking_max_ngram=masking_max_ngram,
            masking_use_geometric_distribution=masking_use_geometric_distribution, **kwargs,
        )
        self.seq_length_decoder = seq_length_decoder

    def load_tokenizer(self, spec: str | None) -> MaskedLMTokenizer:
        tokenizer = super().load_tokenizer(spec)
        if not tokenizer.additional_special_tokens_ids:
            raise UserError(f"tokenizer {tokenizer.path} has no sentinel tokens <extra_id_N>, which T5 data needs")
        return tokenizer

    def dataset_class(self) -> type:
        return T5MaskedWordPieceDataset

    def dataset_config(self, **common: Any) -> T5MaskedWordPieceDatasetConfig:
        return T5MaskedWordPieceDatasetConfig(**common, **self.masking, sequence_length_decoder=self.seq_length_decoder)
