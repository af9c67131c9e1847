"""Two "nodes" on one machine: torchrun on loopback, one process per node, tensor parallelism across the nodes.

The commands are docs/multi-node.md's; the run must log the losses of a single process."""

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from launch import REPO, _free_port, child_env

RECIPE = str(REPO / "recipes" / "gpt-tiny.yaml")
RUN = ["fit", "--config", RECIPE, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
       "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_checkpointing",
       "false"]


def train_losses(root: Path) -> dict[int, float]:
    with open(root / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(handle) if row["train_loss"]}


@pytest.mark.slow
def test_two_nodes_on_loopback_with_tensor_parallelism_across_them_match_one_process(gpt_tiny_run, tmp_path):
    command = shutil.which("lightning-megatron")
    assert command is not None, "the lightning-megatron console script is not installed"
    port = _free_port()
    nodes = [subprocess.Popen(
        ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
         "127.0.0.1", "--master-port", str(port), "--no-python", "lightning-megatron", *RUN,
         "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy.tensor_model_parallel_size", "2",
         "--trainer.default_root_dir", str(tmp_path / "two")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=child_env()) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "Sample: In the beginning" in outputs[0]
    expected, got = train_losses(gpt_tiny_run), train_losses(tmp_path / "two")  # the same run in one process
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-4), step
