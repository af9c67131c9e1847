"""The benchmark scripts run end to end on the CPU (their figures are only meaningful on a GPU)."""

import json
import subprocess
import sys

import pytest

from launch import REPO, child_env


@pytest.mark.slow
def test_train_throughput_smoke_reports_the_overhead_ratio(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--device", "cpu", "--cases", "overhead", "--steps", "4",
         "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy overhead: step time ours / bare =" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["name"] for row in rows] == ["bare megatron-core loop", "Trainer(strategy='megatron')"]
    assert all(row["tokens_per_s"] > 0 and "CPU" in row["hardware"] for row in rows)
