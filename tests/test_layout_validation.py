"""Bad layouts and batch sizes fail with a message naming the fix, before any process group exists."""

import lightning as L
import pytest
from megatron.core import parallel_state

import lightning_megatron as lm
from lightning_megatron.data import TextDataModule
from lightning_megatron.errors import UserError
from lightning_megatron.parallel import LayoutError, ParallelConfig


def test_model_parallel_must_divide_world():
    with pytest.raises(LayoutError, match="does not divide the 3 processes"):
        ParallelConfig(tensor_model_parallel_size=2).validate(world_size=3)


def test_heads_must_divide_by_tp():
    with pytest.raises(LayoutError, match="num_attention_heads=6 is not divisible by tensor_model_parallel_size=4"):
        ParallelConfig(tensor_model_parallel_size=4).validate_model(num_layers=4, num_attention_heads=6)


def test_layers_must_split_into_virtual_stages():
    config = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3)
    with pytest.raises(LayoutError, match="num_layers=4 does not split"):
        config.validate_model(num_layers=4, num_attention_heads=4)


def test_sequence_parallel_needs_tp():
    with pytest.raises(LayoutError, match="sequence_parallel needs tensor_model_parallel_size >= 2"):
        ParallelConfig(sequence_parallel=True).validate(world_size=1)


def test_sequence_must_split_over_context_and_sequence_parallelism():
    assert ParallelConfig().seq_len_divisor == 1
    assert ParallelConfig(context_parallel_size=2).seq_len_divisor == 4
    assert ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True, context_parallel_size=2).seq_len_divisor == 8
    with pytest.raises(LayoutError, match="sequence length 6 does not split .* a multiple of 4"):
        ParallelConfig(context_parallel_size=2).check_sequence_length(6)
    ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True).check_sequence_length(6)


def test_strategy_takes_config_objects_or_flat_arguments_not_both():
    layout = ParallelConfig(tensor_model_parallel_size=2, virtual_pipeline_model_parallel_size=1)
    strategy = lm.MegatronStrategy(parallel_config=layout, recompute=lm.RecomputeConfig("selective"),
                                   ddp=lm.DDPConfig(use_distributed_optimizer=True))
    assert strategy.parallel_config is layout and layout.vp is None
    flat = lm.MegatronStrategy(tensor_model_parallel_size=2, recompute_granularity="selective",
                               use_distributed_optimizer=True)
    assert (flat.parallel_config, flat.recompute, flat.ddp) == (ParallelConfig(tensor_model_parallel_size=2),
                                                                 strategy.recompute, strategy.ddp)
    with pytest.raises(ValueError, match="either parallel_config=... or its flat keyword arguments, not both"):
        lm.MegatronStrategy(parallel_config=layout, pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="recompute_granularity='full' needs recompute_method"):
        lm.MegatronStrategy(recompute_granularity="full")


def _fit(strategy, data=None, **trainer_kwargs):
    model = lm.GPT(lm.GPTConfig.tiny(vocab_size=4096, num_layers=2, hidden_size=32, seq_length=16))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kwargs)
    trainer.fit(model, datamodule=data or TextDataModule(seq_length=16, global_batch_size=4, micro_batch_size=2))


def test_trainer_rejects_tp_larger_than_world_before_any_collective():
    with pytest.raises(LayoutError, match="does not divide the 1 processes"):
        _fit(lm.MegatronStrategy(tensor_model_parallel_size=2))
    assert not parallel_state.model_parallel_is_initialized()


def test_trainer_rejects_global_batch_not_divisible_by_micro_batch_times_dp():
    data = TextDataModule(seq_length=16, global_batch_size=8, micro_batch_size=4, rampup_batch_size=[2, 2, 32])
    with pytest.raises(LayoutError, match="a ramp-up global batch size=2 is not divisible by micro_batch_size .4."):
        _fit("megatron", data)


def test_trainer_rejects_lightning_gradient_accumulation():
    with pytest.raises(LayoutError, match="gradient accumulation is the number of microbatches"):
        _fit("megatron", accumulate_grad_batches=2)


def test_trainer_rejects_precision_megatron_cannot_honour():
    with pytest.raises(ValueError, match="precision='bf16-true' is not supported by the megatron strategy"):
        _fit("megatron", precision="bf16-true")


def test_overlapping_communication_needs_a_gpu():
    with pytest.raises(LayoutError, match="overlap_grad_reduce / overlap_param_gather need CUDA streams"):
        _fit(lm.MegatronStrategy(overlap_grad_reduce=True))


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(UserError, match=r"cuda_graphs=True needs a GPU .*; leave MegatronStrategy\(cuda_graphs=...\)"):
        _fit(lm.MegatronStrategy(cuda_graphs=True))
    assert not parallel_state.model_parallel_is_initialized()
