"""Global batch size ramp-up: sizes follow megatron's calculator, every DP layout reads the same global batches."""

import pytest

from launch import read_json, run_python, torchrun
from lightning_megatron.data.sampler import GlobalBatchSampler, GlobalBatchSizes


def test_ramp_grows_evenly_then_stays():
    sizes = GlobalBatchSizes(16, [4, 4, 48])
    consumed, seen = 0, []
    for _ in range(9):
        seen.append(sizes.at(consumed))
        consumed += seen[-1]
    assert seen == [4, 4, 4, 4, 8, 8, 12, 12, 16]
    assert sizes.sizes() == [4, 8, 12, 16]
    assert sizes.consumed_after(9) == consumed


def test_ramp_must_reach_the_global_batch_in_whole_increments():
    with pytest.raises(ValueError, match="reach it in whole increments"):
        GlobalBatchSizes(16, [4, 5, 48])


def test_ramped_sampler_is_the_same_global_batches_for_every_dp_size():
    def global_batches(dp_size, consumed=0):
        sizes = GlobalBatchSizes(8, [2, 2, 24])
        samplers = [GlobalBatchSampler(64, sizes, dp_rank=r, dp_size=dp_size, seed=3,
                                       consumed_samples=lambda: consumed) for r in range(dp_size)]
        return [sorted(sum(parts, [])) for parts in zip(*samplers)]

    single = global_batches(1)
    assert [len(b) for b in single[:7]] == [2, 2, 2, 2, 4, 4, 6]
    assert global_batches(2) == single
    # Resuming after 3 steps (6 samples) continues with the 4th global batch.
    assert global_batches(2, consumed=6) == single[3:]


@pytest.mark.slow
def test_ramp_up_trains_identically_under_data_parallel(tmp_path):
    args = ["--steps", 5, "--global-batch", 8, "--micro-batch", 2, "--rampup", 4, 4, 12]
    run_python("train_gpt.py", "--out", tmp_path / "one.json", *args)
    torchrun("train_gpt.py", 2, "--out", tmp_path / "two.json", "--devices", 2, *args)
    one, two = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a)
