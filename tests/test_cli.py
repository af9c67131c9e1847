"""The command line a user types: the recipe trains, prints a sample, and accepts layout overrides."""

import subprocess
import sys

import pytest

from launch import REPO, child_env

FAST = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_checkpointing", "false"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_megatron", *args], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=timeout)


def test_strategy_by_name_in_yaml_resolves(tmp_path):
    config = tmp_path / "name.yaml"
    config.write_text("trainer:\n  strategy: megatron\n")
    result = cli("fit", "--config", "recipes/gpt-tiny.yaml", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy: megatron" in result.stdout


@pytest.mark.slow
def test_recipe_trains_with_tensor_parallel_override_and_prints_a_sample(tmp_path):
    result = cli("fit", "--config", "recipes/gpt-tiny.yaml", "--trainer.devices", "2",
                 "--trainer.strategy.tensor_model_parallel_size", "2",
                 "--trainer.default_root_dir", str(tmp_path), *FAST)
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "Sample: In the beginning" in output
    assert "tokens_per_s=" in output


def test_bad_layout_from_the_command_line_names_the_fix(tmp_path):
    result = cli("fit", "--config", "recipes/gpt-tiny.yaml", "--trainer.strategy.tensor_model_parallel_size", "3",
                 "--trainer.default_root_dir", str(tmp_path), *FAST, timeout=300)
    assert result.returncode != 0
    assert "does not divide the 1 processes" in result.stderr
