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
         "--warmup", "1", "--overhead-rounds", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy overhead: step time ours / bare =" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["name"] for row in rows] == ["bare megatron-core loop", "Trainer(strategy='megatron')",
                                             "step time ours / bare"]
    assert all(row["tokens_per_s"] > 0 and "CPU" in row["hardware"] for row in rows[:2])
    assert len(rows[2]["rounds"]) == 2 and min(rows[2]["rounds"]) <= rows[2]["median"] <= max(rows[2]["rounds"])


@pytest.mark.slow
def test_generate_smoke_reports_int8_weight_memory_and_speed(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "benchmarks/generate.py", "--smoke", "--engines", "eager", "int8", "--batches", "1",
         "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # fp32 on the CPU: int8 weights plus one fp32 scale per row are a little over a quarter of the bytes.
    assert "int8 (weight_int8pack_mm): linear weights 12.0 MiB (float32) -> 3.0 MiB (int8 + scales), 0.25x" \
        in result.stdout
    assert "batch 1: lightning-megatron int8 / lightning-megatron (eager): decode" in result.stdout
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["engine"] for row in record["rows"]] == ["lightning-megatron (eager)", "lightning-megatron int8"]
    assert record["int8_linear_weight_bytes"] < record["linear_weight_bytes"] / 3
