"""Fine-tuning data: loss only on responses, padding and packing; your own token-id datasets as GPT samples."""

import json

import pytest
import torch

from lightning_megatron.data.samples import DatasetDataModule, GPTSamples
from lightning_megatron.data.sft import SFTDataModule, encode_conversation, sft_dataset
from lightning_megatron.data.tokenizer import bundled_tokenizer

EXAMPLES = [
    {"prompt": "Who created the heaven?", "response": "God created the heaven and the earth."},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What was first?"},
                  {"role": "assistant", "content": "Light."},
                  {"role": "user", "content": "And then?"},
                  {"role": "assistant", "content": "The firmament."}]},
] * 6


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    return path


def _learned_text(tokenizer, sample):
    return tokenizer.decode(sample["labels"][sample["loss_mask"] == 1].tolist())


def test_loss_only_on_responses(sft_file):
    tokenizer = bundled_tokenizer()
    dataset = sft_dataset(sft_file, tokenizer, seq_length=96)
    assert len(dataset) == 12
    first, second = dataset[0], dataset[1]
    assert _learned_text(tokenizer, first) == "God created the heaven and the earth."
    assert first["labels"][first["loss_mask"] == 1][-1] == tokenizer.eod
    assert _learned_text(tokenizer, second) == "Light.The firmament."
    assert "Who created" in tokenizer.decode(first["tokens"].tolist())
    ids, mask = encode_conversation(tokenizer, [{"role": "user", "content": EXAMPLES[0]["prompt"]},
                                                {"role": "assistant", "content": EXAMPLES[0]["response"]}])
    used = len(ids) - 1  # predictions made: the last id (EOD) is only a label
    assert first["tokens"][: used + 1].tolist() == ids and first["labels"][used - 1] == tokenizer.eod
    assert first["loss_mask"].tolist() == [float(m) for m in mask[1:]] + [0.0] * (96 - used)
    assert (first["tokens"][used + 1 :] == tokenizer.pad).all()


def test_packing_puts_several_examples_in_one_sample(sft_file):
    tokenizer = bundled_tokenizer()
    padded = sft_dataset(sft_file, tokenizer, seq_length=128)
    packed = sft_dataset(sft_file, tokenizer, seq_length=128, packed=True)
    assert len(packed) < len(padded)
    learned = "".join(_learned_text(tokenizer, packed[i]) for i in range(len(packed)))
    assert learned == "".join(_learned_text(tokenizer, padded[i]) for i in range(len(padded)))
    positions = packed[0]["position_ids"]
    assert (positions[1:] == 0).any(), "position ids restart at each packed example"


def test_sft_datamodule_and_bad_files(sft_file, tmp_path):
    data = SFTDataModule(str(sft_file), val_fraction=0.34, seq_length=64, global_batch_size=4, micro_batch_size=2)
    data.setup("fit")
    assert (len(data.train_dataset), len(data.val_dataset)) == (8, 4)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"} and batch["tokens"].shape == (4, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no response"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 needs 'prompt' and 'response', or 'messages'"):
        sft_dataset(bad, bundled_tokenizer(), 64)
    with pytest.warns(UserWarning, match="2 example"), pytest.raises(ValueError, match="no example has a response"):
        sft_file.write_text("\n".join(json.dumps({"prompt": "word " * 80, "response": "x"}) for _ in range(2)))
        sft_dataset(sft_file, bundled_tokenizer(), 16)


def test_own_token_sequences_become_gpt_samples():
    sequences = [list(range(10, 10 + n)) for n in (5, 12, 30)]
    samples = GPTSamples(sequences, seq_length=8, pad_id=0)
    short = samples[0]
    assert short["tokens"].tolist() == [10, 11, 12, 13, 14, 0, 0, 0]
    assert short["labels"].tolist() == [11, 12, 13, 14, 0, 0, 0, 0]
    assert short["loss_mask"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert samples[2]["tokens"].tolist() == list(range(10, 18)) and samples[2]["labels"][-1] == 18
    data = DatasetDataModule(GPTSamples(sequences * 4, 8), global_batch_size=4, micro_batch_size=2)
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    with pytest.raises(KeyError, match="without 'input_ids'"):
        GPTSamples([{"ids": [1, 2]}], 8)[0]
