import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(autouse=True)
def _no_megatron_state():
    """Each test starts with megatron's parallel state torn down, as a fresh process would."""
    yield
    from lightning_megatron import parallel

    parallel.destroy()
