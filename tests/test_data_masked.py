"""BERT and T5 data: megatron-core's masked WordPiece datasets over a preprocessed corpus and a fresh WordPiece."""

import itertools

import pytest

from lightning_megatron.data.corpus import BUNDLED_CORPUS, read_texts
from lightning_megatron.data.masked import (MaskedLMTokenizer, MegatronBERTDataModule, MegatronT5DataModule,
                                            train_wordpiece)
from lightning_megatron.data.preprocess import PreprocessConfig, preprocess

BERT_KEYS = {"text", "types", "labels", "is_random", "padding_mask", "loss_mask", "truncated"}
T5_KEYS = {"text_enc", "text_dec", "labels", "loss_mask", "truncated", "enc_mask", "dec_mask"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    texts = list(itertools.islice(read_texts(BUNDLED_CORPUS), 80))
    tokenizer = train_wordpiece(texts, 1500, root / "wordpiece.json", num_sentinels=50)
    (root / "kjv.txt").write_text("\n".join(texts))
    preprocess(PreprocessConfig(inputs=[str(root / "kjv.txt")], output_prefix=str(root / "kjv"), tokenizer=str(tokenizer),
                                split_sentences=True, workers=1), progress=False)
    return root / "kjv", tokenizer


def test_bert_batches(corpus, tmp_path):
    prefix, tokenizer_path = corpus
    data = MegatronBERTDataModule(str(prefix), str(tokenizer_path), seq_length=64, global_batch_size=8,
                                  micro_batch_size=4, split="9,1,0", num_samples=[64, 16, 0], index_cache_dir=str(tmp_path))
    data.setup("fit")
    tokenizer = MaskedLMTokenizer(tokenizer_path)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == BERT_KEYS and batch["text"].shape == (8, 64)
    assert (batch["text"][:, 0] == tokenizer.cls).all()
    masked = batch["loss_mask"] == 1
    assert ((batch["labels"] >= 0) == masked).all() and (batch["labels"][~masked] == -1).all()
    real = int(batch["padding_mask"].sum())
    assert 0.08 < masked.sum() / real < 0.2  # about 15% of the tokens are masked
    assert (batch["text"][batch["padding_mask"] == 0] == 0).all()
    assert set(batch["types"].unique().tolist()) <= {0, 1} and set(batch["is_random"].tolist()) <= {0, 1}


def test_t5_batches(corpus, tmp_path):
    prefix, tokenizer_path = corpus
    data = MegatronT5DataModule(str(prefix), str(tokenizer_path), seq_length=64, seq_length_decoder=32,
                                global_batch_size=8, micro_batch_size=4, split="9,1,0", num_samples=[64, 16, 0],
                                index_cache_dir=str(tmp_path))
    data.setup("fit")
    tokenizer = MaskedLMTokenizer(tokenizer_path)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == T5_KEYS
    assert batch["text_enc"].shape == (8, 64) and batch["text_dec"].shape == (8, 32)
    first_sentinel = tokenizer.additional_special_tokens_ids[0]
    assert (batch["text_dec"][:, 0] == tokenizer.bos).all() and (batch["text_dec"][:, 1] == first_sentinel).all()
    assert ((batch["text_enc"] == first_sentinel).sum(dim=1) == 1).all()
    assert (batch["labels"][:, :-1] == batch["text_dec"][:, 1:])[batch["loss_mask"][:, 1:] == 1].all()


def test_masked_data_needs_a_wordpiece_tokenizer(corpus, tmp_path):
    prefix, _ = corpus
    from lightning_megatron.data.tokenizer import bundled_tokenizer

    with pytest.raises(ValueError, match=r"lacks \['\[PAD\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        MaskedLMTokenizer(bundled_tokenizer().path)
    data = MegatronT5DataModule(str(prefix), str(train_wordpiece(["a b c"] * 10, 100, tmp_path / "w.json", 0)))
    with pytest.raises(ValueError, match="no sentinel tokens"):
        data.tokenizer
    with pytest.raises(ValueError, match="need sample counts"):
        MegatronBERTDataModule(str(prefix), str(corpus[1]), split="9,1,0", seq_length=64).setup("fit")
    with pytest.raises(ValueError, match=r"the test split of .*kjv\.idx is empty: split '969,30,1' gives it none "
                                         r"of its 80 documents"):
        MegatronBERTDataModule(str(prefix), str(corpus[1]), seq_length=64, num_samples=[8, 8, 8]).setup("fit")
