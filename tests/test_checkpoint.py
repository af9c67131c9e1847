"""Sharded checkpoints: exact resume, crash safety, async save, resharding, consolidated export, clear errors.

The multi-process runs share one uninterrupted 10-step reference (DP=2, distributed optimizer); every resumed run
must reproduce its losses and its batches step for step. The runs that end normally go one after another in one
launch (``runs``); the run killed while saving has a launch of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun, train_together

from lightning_megatron import checkpoint as ckpt

DP2 = "--dist-opt"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def runs(workdir: Path) -> dict[str, dict]:
    """Every two-process run of this file that ends normally, by name, one after another in one launch."""
    return train_together(workdir, 2, {
        "reference": [DP2, "--steps", 10],  # 10 uninterrupted steps
        # 5 steps of the reference run (same schedule), checkpointed every 5 steps; then resumed from the last.
        "first_half": [DP2, "--steps", 5, "--decay-steps", 10, "--save-dir", workdir / "sync", "--every-n", 5],
        "second_half": [DP2, "--steps", 10, "--save-dir", workdir / "sync", "--resume", "last"],
        # The same with background saves.
        "async_first": [DP2, "--steps", 5, "--decay-steps", 10, "--save-dir", workdir / "async", "--every-n", 5,
                        "--async-save"],
        "async_second": [DP2, "--steps", 10, "--save-dir", workdir / "async", "--every-n", 5, "--async-save",
                         "--resume", "last"],
        # TP2 trains 4 steps; PP2 resumes its step-2 checkpoint (weights and optimizer); TP2 then evaluates PP2's
        # final checkpoint; each layout imports the other's consolidated export.
        "tp2": ["--tp", 2, "--steps", 4, "--save-dir", workdir / "tp2", "--every-n", 2],
        "pp2": ["--pp", 2, "--steps", 4, "--resume", workdir / "tp2" / "step=2.ckpt", "--save-end",
                workdir / "pp2.ckpt", "--export", workdir / "pp2.safetensors"],
        "tp2_eval": ["--tp", 2, "--validate-only", "--resume", workdir / "pp2.ckpt", "--export",
                     workdir / "tp2.safetensors"],
        "tp2_import": ["--tp", 2, "--validate-only", "--import", workdir / "pp2.safetensors"],
        "pp2_import": ["--pp", 2, "--validate-only", "--import", workdir / "tp2.safetensors"],
        # torch's fused AdamW: its own resume, and a resume of the reference's (multi-tensor AdamW) checkpoint.
        "fused_reference": [DP2, "--fused-adam", "--steps", 10],
        "fused_first": [DP2, "--fused-adam", "--steps", 5, "--decay-steps", 10, "--save-dir", workdir / "fused",
                        "--every-n", 5],
        "fused_second": [DP2, "--fused-adam", "--steps", 10, "--save-dir", workdir / "fused", "--resume", "last"],
        "fused_from_foreach": [DP2, "--fused-adam", "--steps", 10, "--resume", workdir / "sync" / "step=5.ckpt"],
        "fused_pp2": ["--pp", 2, "--fused-adam", "--steps", 4, "--resume", workdir / "tp2" / "step=2.ckpt"],
    })


@pytest.fixture(scope="module")
def reference(runs: dict) -> dict:
    return runs["reference"]


@pytest.fixture(scope="module")
def saved_at_5(runs: dict, workdir: Path) -> Path:
    """The checkpoints of the first half (step=5.ckpt and last.ckpt), and those the second half added."""
    return workdir / "sync"


def _assert_continues(reference: dict, resumed: dict, first_step: int, tolerance: float = 1e-6) -> None:
    start = first_step - 1
    assert resumed["steps"] == list(range(first_step, 11))
    assert resumed["batches"] == reference["batches"][start:], "resumed run read different data"
    assert resumed["losses"] == pytest.approx(reference["losses"][start:], abs=tolerance)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], abs=tolerance)


@pytest.mark.slow
def test_resume_from_last_matches_uninterrupted_run(runs, reference):
    assert runs["first_half"]["saved"] == {"last.ckpt": 5, "step=5.ckpt": 5}  # the directory the second half found
    _assert_continues(reference, runs["second_half"], first_step=6)


@pytest.mark.slow
def test_fused_adam_trains_and_resumes_like_the_multi_tensor_one(runs, reference):
    """The fused kernel trains as the multi-tensor one does (float rounding apart) and resumes its own checkpoint
    exactly; it also resumes the multi-tensor reference's checkpoint (distributed optimizer, DP=2) and a TP=2
    checkpoint under PP=2 (megatron's plain optimizer)."""
    fused = runs["fused_reference"]
    assert fused["losses"] == pytest.approx(reference["losses"], abs=1e-4)
    for name in ("fused_reference", "fused_second", "fused_from_foreach", "fused_pp2"):
        assert runs[name]["adam_fused"] and all(runs[name]["adam_fused"]), name  # a resume keeps the kernel
    assert not any(reference["adam_fused"])
    _assert_continues(fused, runs["fused_second"], first_step=6)
    _assert_continues(reference, runs["fused_from_foreach"], first_step=6, tolerance=1e-4)
    assert runs["fused_pp2"]["losses"] == pytest.approx(runs["tp2"]["losses"][2:], rel=1e-4)


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint_resumable(workdir, reference):
    save_dir = workdir / "killed"
    run = [DP2, "--steps", 10, "--save-dir", save_dir, "--every-n", 2]
    result = torchrun("train_gpt.py", 2, "--devices", 2, "--out", workdir / "killed.json", *run, "--kill-at-save", 4,
                      timeout=240, check=False)
    assert result.returncode != 0
    names = sorted(p.name for p in save_dir.iterdir())
    assert names == ["last.ckpt", "step=2.ckpt", "step=4.ckpt.partial"], names
    assert ckpt.read_layout(save_dir / "last.ckpt").global_step == 2
    with pytest.raises(FileNotFoundError, match="never finished"):
        ckpt.read_layout(save_dir / "step=4.ckpt")
    resumed = train_together(workdir, 2, {"after_kill": [*run, "--resume", "last"]})["after_kill"]
    _assert_continues(reference, resumed, first_step=3)
    assert not (save_dir / "step=4.ckpt.partial").exists()
    assert ckpt.read_layout(save_dir / "last.ckpt").global_step == 10


@pytest.mark.slow
def test_async_save_then_resume(runs, reference, workdir):
    save_dir = workdir / "async"
    assert ckpt.read_layout(save_dir / "step=5.ckpt").global_step == 5
    _assert_continues(reference, runs["async_second"], first_step=6)
    assert ckpt.read_layout(save_dir / "last.ckpt").global_step == 10


@pytest.mark.slow
def test_reshard_tp2_to_pp2_and_back(runs, workdir):
    """TP2 trains 4 steps; PP2 resumes its step-2 checkpoint (weights and optimizer) and must follow the same losses;
    TP2 then evaluates PP2's final checkpoint. Consolidated exports of both layouts hold identical tensors, and
    TP2 importing PP2's export (and PP2 importing TP2's) evaluates the same."""
    tp2, pp2 = runs["tp2"], runs["pp2"]
    assert pp2["steps"] == [3, 4]
    assert pp2["losses"] == pytest.approx(tp2["losses"][2:], rel=1e-5)
    assert pp2["val_loss"] == pytest.approx(tp2["val_loss"], rel=1e-5)
    assert runs["tp2_eval"]["val_loss"] == pytest.approx(pp2["val_loss"], rel=1e-6)
    exported_pp, exported_tp = load_file(workdir / "pp2.safetensors"), load_file(workdir / "tp2.safetensors")
    assert sorted(exported_pp) == sorted(exported_tp)
    assert "decoder.layers.3.self_attention.linear_qkv.weight" in exported_pp
    for name, tensor in exported_pp.items():
        torch.testing.assert_close(exported_tp[name], tensor, rtol=0, atol=0, msg=name)
    assert runs["tp2_import"]["val_loss"] == pytest.approx(pp2["val_loss"], rel=1e-6)
    # The last stage's output layer is tied to the first stage's embedding: it loads the embedding's tensor.
    assert runs["pp2_import"]["val_loss"] == pytest.approx(pp2["val_loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------ validation (no processes)
def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.read_layout(tmp_path / "nope.ckpt")


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    partial = tmp_path / "step=3.ckpt"
    partial.mkdir()
    (partial / "metadata.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match=r"incomplete \(no layout.json, trainer.pt\)"):
        ckpt.read_layout(partial)


def test_a_file_is_not_a_sharded_checkpoint(tmp_path):
    single = tmp_path / "model.ckpt"
    torch.save({}, single)
    with pytest.raises(ckpt.CheckpointError, match="is a file"):
        ckpt.read_layout(single)


@pytest.mark.slow
def test_other_model_config_names_key_and_shapes(saved_at_5):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    template = {"model": {"embedding.word_embeddings.weight": ShardedTensor.from_rank_offsets(
        "embedding.word_embeddings.weight", torch.zeros(4096, 32))}}
    problems = ckpt.mismatches(saved_at_5 / "last.ckpt", template)
    assert problems == ["embedding.word_embeddings.weight has shape (4096, 64) in the checkpoint but (4096, 32) "
                        "in the model"]


def _layout(**changes) -> ckpt.CheckpointLayout:
    fields = dict(global_step=5, epoch=0, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                  virtual_pipeline_model_parallel_size=None, context_parallel_size=1, data_parallel_size=2,
                  world_size=2, distributed_optimizer=True, params_dtype="float32", has_optimizer=True, module="GPT")
    return ckpt.CheckpointLayout.from_dict({**fields, **changes})


def test_distributed_optimizer_state_reshards_over_data_parallelism_only():
    saved = _layout()
    ckpt.check_compatible("c", saved, _layout(data_parallel_size=4, world_size=4), load_optimizer=True)
    tp2 = _layout(tensor_model_parallel_size=2, data_parallel_size=1)
    with pytest.raises(ckpt.CheckpointError, match=r"saved as TP1 PP1 VP- CP1 DP2 .*this run is TP2 PP1 .*"
                                                   r"ckpt_load_optimizer=False"):
        ckpt.check_compatible("c", saved, tp2, load_optimizer=True)
    ckpt.check_compatible("c", saved, tp2, load_optimizer=False)
    with pytest.raises(ckpt.CheckpointError, match="use_distributed_optimizer=True, this run has False"):
        ckpt.check_compatible("c", saved, _layout(distributed_optimizer=False), load_optimizer=True)
    plain = _layout(distributed_optimizer=False)
    ckpt.check_compatible("c", plain, _layout(distributed_optimizer=False, pipeline_model_parallel_size=2),
                          load_optimizer=True)


@pytest.mark.slow
def test_wrong_dtype_is_refused_before_loading(saved_at_5):
    import lightning_megatron as lm

    strategy = lm.MegatronStrategy(precision_plugin=lm.MegatronPrecision("bf16-mixed"))
    with pytest.raises(ckpt.CheckpointError, match="holds float32 parameters but this run uses bfloat16"):
        strategy.load_checkpoint(saved_at_5 / "last.ckpt")


@pytest.mark.slow
def test_inspect_prints_layout_step_and_shapes(saved_at_5, capsys):
    from lightning_megatron.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["checkpoint", "inspect", str(saved_at_5 / "step=5.ckpt")])
    assert exit_code.value.code == 0
    printed = capsys.readouterr().out
    assert "TP1 PP1 VP- CP1 DP2 (2 ranks), step 5" in printed
    assert "decoder.layers.self_attention.linear_qkv.weight" in printed and "(4, 192, 64)" in printed
    assert json.loads((saved_at_5 / "step=5.ckpt" / "layout.json").read_text())["distributed_optimizer"] is True
