"""Preprocessing: corpus -> .bin/.idx round trip, input formats, and clear errors for bad or damaged files."""

import gzip
import itertools
import json
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from lightning_megatron_cli import COMMANDS
from lightning_megatron.data.corpus import BUNDLED_CORPUS, read_texts
from lightning_megatron.data.indexed import check_vocab_size, inspect_indexed, max_token_id
from lightning_megatron.data.preprocess import PreprocessConfig, main, preprocess, split_sentences
from lightning_megatron.data.tokenizer import bundled_tokenizer

TEXTS = list(itertools.islice(read_texts(BUNDLED_CORPUS), 60))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A .jsonl.gz of 60 KJV chapters with an empty document in the middle."""
    path = tmp_path_factory.mktemp("corpus") / "kjv.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i, text in enumerate(TEXTS):
            handle.write(json.dumps({"text": text}) + "\n")
            if i == 10:
                handle.write(json.dumps({"text": ""}) + "\n")
    return path


@pytest.fixture(scope="module")
def prefix(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed") / "kjv"
    summary = preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(out), append_eod=True, workers=2,
                                          chunk_size=7), progress=False)
    assert (summary.documents, summary.skipped_documents) == (len(TEXTS), 1)
    return out


def test_round_trip_yields_the_tokenizers_ids_with_eod(prefix):
    tokenizer = bundled_tokenizer()
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        assert dataset[i].tolist() == tokenizer.encode(text) + [tokenizer.eod]
    assert dataset[0].dtype == np.uint16  # 4096-token vocabulary fits 16 bits
    info = inspect_indexed(prefix)
    assert info.num_tokens == sum(len(tokenizer.encode(t)) + 1 for t in TEXTS)
    assert not list(prefix.parent.glob(".*tmp*")), "temporary files left behind"


def test_cli_plain_text_per_file_with_sentences(tmp_path, capsys):
    assert COMMANDS["preprocess"][0] == "lightning_megatron.data.preprocess:main"
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(TEXTS[:3]):
        (docs / f"{i}.txt").write_text(text)
    out = tmp_path / "out" / "plain"
    assert main(["--input", str(docs), "--output-prefix", str(out), "--text-mode", "file", "--split-sentences",
                 "--workers", "1", "--quiet"]) == 0
    assert "3 documents" in capsys.readouterr().out
    tokenizer = bundled_tokenizer()
    dataset = IndexedDataset(str(out))
    sentences = [s for text in TEXTS[:3] for s in split_sentences(text)]
    assert len(dataset) == len(sentences)  # one sequence per sentence
    assert [dataset[i].tolist() for i in range(len(sentences))] == [tokenizer.encode(s) for s in sentences]
    assert dataset.document_indices.tolist()[-1] == len(sentences)


def test_split_sentences():
    assert split_sentences('And God said, Let there be light. And there was light! Was it "good?" Yes. See e.g. the end') == [
        "And God said, Let there be light.", "And there was light!", 'Was it "good?"', "Yes.", "See e.g. the end"]


def test_cli_errors_name_the_problem(tmp_path, corpus, capsys):
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert main(["--input", str(corpus), "--json-key", "body", "--output-prefix", str(tmp_path / "x"),
                 "--workers", "1", "--quiet"]) == 2
    assert "has no field 'body'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*x*")) and not list(tmp_path.glob(".x*")), "a failed run left files"


def test_parquet_needs_pyarrow(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "c.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="needs pyarrow"):
            preprocess(PreprocessConfig(inputs=[str(tmp_path / "c.parquet")], output_prefix=str(tmp_path / "p"),
                                        workers=1), progress=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS[:5]}), tmp_path / "c.parquet")
    preprocess(PreprocessConfig(inputs=[str(tmp_path / "c.parquet")], output_prefix=str(tmp_path / "p"), workers=1),
               progress=False)
    dataset = IndexedDataset(str(tmp_path / "p"))
    assert dataset[4].tolist() == bundled_tokenizer().encode(TEXTS[4])


def _copy(prefix, tmp_path, name):
    target = tmp_path / name
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prefix}{suffix}", f"{target}{suffix}")
    return target


def test_missing_files(prefix, tmp_path):
    target = _copy(prefix, tmp_path, "a")
    (tmp_path / "a.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.bin does not exist.*lightning-megatron preprocess"):
        inspect_indexed(target)
    target = _copy(prefix, tmp_path, "b")
    (tmp_path / "b.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.idx does not exist"):
        inspect_indexed(target)


def test_truncated_or_mismatched_files(prefix, corpus, tmp_path):
    target = _copy(prefix, tmp_path, "t")
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"t\.bin does not match .*t\.idx.*truncated"):
        inspect_indexed(target)
    # An index from another corpus next to this .bin.
    other = tmp_path / "other"
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(other), workers=1), progress=False)
    target = _copy(prefix, tmp_path, "m")
    shutil.copy(f"{other}.idx", tmp_path / "m.idx")
    with pytest.raises(ValueError, match=r"m\.bin does not match"):
        inspect_indexed(target)
    target = _copy(prefix, tmp_path, "i")
    (tmp_path / "i.idx").write_bytes((tmp_path / "i.idx").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"i\.idx is truncated"):
        inspect_indexed(target)
    (tmp_path / "i.idx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"i\.idx is not a megatron-core index"):
        inspect_indexed(target)


def test_vocabulary_larger_than_the_model(prefix):
    largest = max_token_id(prefix)
    dataset = IndexedDataset(str(prefix))  # keep it alive: its arrays are views of its memory map
    assert largest == max(int(dataset[i].max()) for i in range(len(TEXTS)))
    check_vocab_size([prefix], largest + 1)
    with pytest.raises(ValueError, match=rf"kjv\.bin holds token id {largest}, but the model's vocab_size is 100"):
        check_vocab_size([prefix], 100)


def test_a_tokenizer_file_with_padding_and_truncation_writes_exactly_its_ids(tmp_path):
    """A tokenizer.json saved with inference-time padding and truncation (as packaged BERT tokenizers are) must not
    cut long documents nor pad short ones."""
    from tokenizers import Tokenizer as HFTokenizer

    bundled = bundled_tokenizer()
    packaged = HFTokenizer.from_file(str(bundled.path))
    packaged.enable_truncation(max_length=16)
    packaged.enable_padding(length=16, pad_id=bundled.pad, pad_token="<|pad|>")
    packaged.save(str(tmp_path / "tokenizer.json"))
    texts = ["In the beginning", TEXTS[0]]  # far shorter and far longer than 16 tokens
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    assert main(["--input", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--append-eod", "--output-prefix", str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    dataset = IndexedDataset(str(tmp_path / "out"))
    expected = [bundled.encode(text) + [bundled.eod] for text in texts]
    assert len(expected[1]) > 100 and len(expected[0]) < 16
    assert [dataset[i].tolist() for i in range(2)] == expected


@pytest.mark.slow
def test_the_command_exits_right_after_its_summary(corpus, tmp_path):
    import subprocess
    import sys
    import time

    from launch import REPO, child_env

    command = [sys.executable, "-m", "lightning_megatron", "preprocess", "--input", str(corpus), "--append-eod",
               "--output-prefix", str(tmp_path / "p"), "--workers", "2", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    summary = process.stdout.readline()
    printed = time.perf_counter()
    assert process.wait(timeout=120) == 0
    assert summary.startswith(f"wrote {tmp_path / 'p'}.bin/.idx: 60 documents")
    assert time.perf_counter() - printed < 2.0
