import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(autouse=True)
def _no_megatron_state():
    """Each test starts with megatron's parallel state torn down, as a fresh process would."""
    yield
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


@pytest.fixture(autouse=True, scope="module")
def _no_process_group():
    """Each test file ends with no process group left, as its own process would. Tearing down megatron's state
    leaves its groups registered with torch.distributed until the default group goes, each with gloo threads that
    poll: a default group that outlived its file (an in-process Trainer's) kept about 50 threads per test for the
    rest of the session, thousands by its end, taking a core from the runs launched meanwhile."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def gpt_tiny_run(tmp_path_factory) -> Path:
    """``lightning-megatron fit`` of recipes/gpt-tiny.yaml for 4 steps in one process (validating every 2 steps, a loss
    logged every step, no callbacks), trained once for every test that reads it: its default_root_dir, holding
    ``checkpoints/last.ckpt`` and ``lightning_logs/version_0/metrics.csv``. Tests copy what they change."""
    from launch import REPO, child_env

    root = tmp_path_factory.mktemp("gpt-tiny")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_megatron", "fit", "--config", str(REPO / "recipes" / "gpt-tiny.yaml"),
         "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
         "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.callbacks", "[]"],
        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return root
