import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(autouse=True)
def _no_megatron_state():
    """Each test starts with megatron's parallel state torn down, as a fresh process would."""
    yield
    from lightning_megatron import parallel

    parallel.destroy()


@pytest.fixture
def cli_error(capsys) -> Callable[[list[str]], str]:
    """Runs ``lightning-megatron <argv>`` in this process, which must fail with one line on stderr; returns the line."""
    from lightning_megatron.cli import main

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as status:
            main(argv)
        assert status.value.code != 0
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: "), errors
        return errors[0]

    return run


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


@pytest.fixture(scope="module")
def gloo_world():
    """A one-process gloo group with CPU emulation, as a user's notebook would have (an earlier in-process
    Trainer may have left its default group behind, which serves as well)."""
    import torch.distributed as dist

    from lightning_megatron.cpu import CPUEmulation

    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with CPUEmulation():
        yield
    if ours:
        dist.destroy_process_group()


@pytest.fixture
def one_rank(gloo_world):
    """Megatron's parallel state for TP=PP=1 (torn down after each test)."""
    from lightning_megatron import parallel
    from lightning_megatron.parallel import ParallelConfig

    parallel.initialize(ParallelConfig(), seed=1)
    yield ParallelConfig()
    parallel.destroy()
