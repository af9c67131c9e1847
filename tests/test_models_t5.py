"""T5: span-corruption samples are well formed, training under DP=2 matches one process, PP is refused clearly.

Training under TP=2 on the CPU is blocked by the CPU emulation (see docs/models.md); T5's TP=2 forward is proven
by the logit-parity test in test_convert_hf.py."""

import pytest
import torch

from launch import train_together
from lightning_megatron.data.datamodule import TokenWindows
from lightning_megatron.data import SpanCorruption
from lightning_megatron.models.t5 import T5, T5Config
from lightning_megatron.parallel import ParallelConfig


def test_span_corruption_reconstructs_the_text():
    tokens = (torch.arange(5000) % 4000).numpy()
    data = SpanCorruption(TokenWindows(tokens, 64), first_sentinel=4096, decoder_seq_length=32, seed=1)
    for index in range(20):
        sample, window = data[index], data.windows[index]["tokens"].tolist()
        enc = sample["enc_tokens"][sample["enc_mask"].bool()].tolist()
        target = sample["labels"][sample["loss_mask"].bool()].tolist()
        assert torch.equal(sample["dec_tokens"][1:], sample["labels"][:-1]) and sample["dec_tokens"][0] == 0
        spans, current = {}, None
        for token in target:
            if token >= 4096:
                current = spans.setdefault(token, [])
            else:
                current.append(token)
        rebuilt = [t for token in enc for t in (spans[token] if token >= 4096 else [token])]
        assert rebuilt == window


def test_pipeline_parallel_is_refused():
    with pytest.raises(ValueError, match="T5 does not support pipeline_model_parallel_size > 1"):
        T5(T5Config.tiny(300)).transformer_config(**ParallelConfig(pipeline_model_parallel_size=2).transformer_fields(),
                                                 pipeline_dtype=torch.float32)


@pytest.mark.slow
def test_t5_trains_identically_under_dp2_and_tp2(tmp_path):
    args = ["--arch", "t5", "--steps", 4, "--layers", 2]
    reference = train_together(tmp_path, 1, {"ref": args})["ref"]["losses"]
    runs = train_together(tmp_path, 2, {"dp": args, "tp": ["--tp", 2, *args]})
    assert len(reference) == 4 and reference[-1] < reference[0]
    assert runs["dp"]["losses"] == pytest.approx(reference, rel=1e-4)
    assert runs["tp"]["losses"] == pytest.approx(reference, rel=1e-4)
