"""GPT data on indexed datasets: exact token windows, blending, mock mode, errors, DP sampling and resumption."""

import itertools
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from launch import read_json, torchrun
from lightning_megatron.data.corpus import BUNDLED_CORPUS, read_texts
from lightning_megatron.data.gpt_dataset import MegatronGPTDataModule
from lightning_megatron.data.preprocess import PreprocessConfig, preprocess
from lightning_megatron.data.sampler import GlobalBatchSampler
from lightning_megatron.data.tokenizer import bundled_tokenizer

GPT_KEYS = {"tokens", "labels", "loss_mask", "position_ids"}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    with open(root / "kjv.jsonl", "w") as handle:
        for text in itertools.islice(read_texts(BUNDLED_CORPUS), 150):
            handle.write(json.dumps({"text": text}) + "\n")
    preprocess(PreprocessConfig(inputs=[str(root / "kjv.jsonl")], output_prefix=str(root / "kjv"), append_eod=True,
                                workers=1), progress=False)
    return root / "kjv"


def test_samples_are_windows_of_the_documents(prefix, tmp_path):
    data = MegatronGPTDataModule(str(prefix), split="1,0,0", seq_length=64, global_batch_size=8, micro_batch_size=2,
                                 index_cache_dir=str(tmp_path))
    data.setup("fit")
    dataset = data.train_dataset
    documents = IndexedDataset(str(prefix))
    stream = np.concatenate([documents[int(d)] for d in dataset.document_index]).astype(np.int32)
    assert int((stream == bundled_tokenizer().eod).sum()) == 150  # every document ends with EOD
    haystack = stream.tobytes()
    for index in range(len(dataset)):
        sample = dataset[index]
        assert set(sample) == GPT_KEYS
        assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
        assert sample["position_ids"].tolist() == list(range(64)) and bool(sample["loss_mask"].all())
        window = np.append(sample["tokens"].numpy(), sample["labels"][-1].item()).astype(np.int32).tobytes()
        position = haystack.find(window)
        assert position >= 0 and position % 4 == 0, f"sample {index} is not a window of the token stream"
    assert len(dataset) == (len(stream) - 1) // 64  # one epoch, every token used once
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == GPT_KEYS and batch["tokens"].shape == (8, 64)


def _constant_dataset(path, token, documents=200, length=50):
    builder = IndexedDatasetBuilder(f"{path}.bin", dtype=np.uint16)
    for _ in range(documents):
        builder.add_document(np.full(length, token), [length])
    builder.finalize(f"{path}.idx")
    return str(path)


def test_blending_follows_the_weights(tmp_path):
    a, b = _constant_dataset(tmp_path / "a", 7), _constant_dataset(tmp_path / "b", 9)
    data = MegatronGPTDataModule([a, b], weights=[0.3, 0.7], split="1,0,0", seq_length=16, global_batch_size=8,
                                 micro_batch_size=8, num_samples=[20000, 0, 0], index_cache_dir=str(tmp_path))
    data.setup("fit")
    sources = [int(data.train_dataset[i]["tokens"][0]) for i in range(20000)]
    assert abs(sources.count(7) / 20000 - 0.3) < 0.01 and sources.count(7) + sources.count(9) == 20000
    interleaved = MegatronGPTDataModule(["1", a, "3", b], split="1,0,0", seq_length=16, global_batch_size=8,
                                        micro_batch_size=8, num_samples=[4000, 0, 0],
                                        index_cache_dir=str(tmp_path))
    interleaved.setup("fit")
    share = sum(int(interleaved.train_dataset[i]["tokens"][0]) == 7 for i in range(4000)) / 4000
    assert abs(share - 0.25) < 0.01


def test_blend_weights_need_sample_counts(prefix):
    data = MegatronGPTDataModule([str(prefix), str(prefix)], weights=[1, 1], split="98,2,0", seq_length=16)
    with pytest.raises(ValueError, match="blend weights need sample counts"):
        data.setup("fit")


def test_mock_mode_follows_the_batch_contract(tmp_path):
    data = MegatronGPTDataModule(mock=True, seq_length=32, global_batch_size=4, micro_batch_size=2,
                                 num_samples=[64, 8, 8], index_cache_dir=str(tmp_path))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == GPT_KEYS and batch["tokens"].shape == (4, 32)


def test_missing_data_and_empty_split_name_the_files(prefix, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.idx does not exist"):
        MegatronGPTDataModule(str(tmp_path / "nowhere"), seq_length=16).setup("fit")
    data = MegatronGPTDataModule(str(prefix), split="100,0,0", seq_length=16, global_batch_size=4, micro_batch_size=2,
                                 index_cache_dir=str(tmp_path))
    data.setup("fit")
    with pytest.raises(ValueError, match=rf"validation split of {prefix} with split '100,0,0' is empty"):
        data.val_dataloader()
    small = MegatronGPTDataModule(str(prefix), split="99,1,0", seq_length=512, global_batch_size=64,
                                  micro_batch_size=2, index_cache_dir=str(tmp_path))
    small.setup("fit")
    with pytest.raises(ValueError, match=rf"validation split of {prefix}.* fewer than one global batch of 64"):
        small.val_dataloader()


@pytest.mark.parametrize("shuffle", [True, False])
def test_data_parallel_ranks_cover_each_sample_once_and_resume(shuffle):
    num_samples, global_batch = 100, 8  # 12 global batches an epoch, 4 samples dropped
    reference = None
    for dp_size in (1, 2, 4):
        samplers = [GlobalBatchSampler(num_samples, global_batch, rank, dp_size, shuffle=shuffle, seed=3)
                    for rank in range(dp_size)]
        steps = [sum(parts, []) for parts in zip(*(list(s) for s in samplers))]
        assert len(steps) == 12 and all(len(step) == global_batch for step in steps)
        seen = sum(steps, [])
        assert len(set(seen)) == len(seen) == 96  # each sample at most once, all but the remainder
        reference = reference or steps
        assert steps == reference  # the global batches do not depend on the DP size
        for consumed in (5 * global_batch, 12 * global_batch + 2 * global_batch):  # mid-epoch, next epoch
            resumed = [GlobalBatchSampler(num_samples, global_batch, rank, dp_size, shuffle=shuffle, seed=3,
                                          consumed_samples=lambda c=consumed: c) for rank in range(dp_size)]
            after = [sum(parts, []) for parts in zip(*(list(s) for s in resumed))]
            epoch, done = divmod(consumed // global_batch, 12)
            if epoch == 0:
                assert after == steps[done:]
            else:
                fresh = [GlobalBatchSampler(num_samples, global_batch, rank, dp_size, shuffle=shuffle, seed=3,
                                            consumed_samples=lambda: 12 * global_batch) for rank in range(dp_size)]
                assert after == [sum(p, []) for p in zip(*(list(s) for s in fresh))][done:]
                assert shuffle is False or after[0] != steps[done]  # a new epoch reshuffles


@pytest.mark.slow
def test_two_data_parallel_ranks_train_on_disjoint_halves_of_each_global_batch(prefix, tmp_path):
    torchrun("train_gpt.py", 2, "--devices", 2, "--data-prefix", prefix, "--record-samples", tmp_path,
             "--out", tmp_path / "out.json", "--steps", 3, "--global-batch", 8, "--micro-batch", 2, "--seq", 64,
             "--layers", 2, timeout=240)
    losses = read_json(tmp_path / "out.json")["losses"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in (0, 1)]
    reference = MegatronGPTDataModule(str(prefix), split="98,2,0", seq_length=64, global_batch_size=8,
                                      micro_batch_size=2, num_samples=[24, None, None])
    reference.setup("fit")
    for step in range(3):
        expected = [reference.train_dataset[step * 8 + i]["tokens"].tolist() for i in range(8)]
        assert ranks[0][step] + ranks[1][step] == expected
