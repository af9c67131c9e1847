"""`lightning-megatron serve` with tensor parallelism over two real processes, answering concurrent HTTP streams."""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import lightning_megatron as lm
from generation_helpers import cpu_process
import launch
from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import SamplingParams, generate
from test_serve import request

RECIPE = launch.REPO / "recipes" / "gpt-tiny.yaml"
PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd"]


def expected_texts(max_tokens):
    """What one process generates from the recipe's model with its initial weights (the same in every layout)."""
    config = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["config"]
    tokenizer = load_tokenizer(None)
    with cpu_process():
        model = lm.GPT(lm.GPTConfig(**config))
        model.configure_model()
        return [o.text for o in generate(model, PROMPTS, SamplingParams(max_new_tokens=max_tokens),
                                         tokenizer=tokenizer)]


def start_serving(log: Path, *command: str) -> tuple[subprocess.Popen, int]:
    """Start ``command`` (a serve command on port 0) logging to ``log``; wait until it says where it listens."""
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=launch.child_env(),
                               cwd=launch.REPO, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(1)
        match = re.search(r"Serving \S+ on http://127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return process, int(match.group(1))
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_serve_tp2_answers_concurrent_streams_and_shuts_down(tmp_path):
    log = tmp_path / "serve.log"
    process, port = start_serving(
        log, sys.executable, str(launch.REPO / "lightning_megatron" / "cli.py"), "serve", "--config", str(RECIPE),
        "--devices", "2", "--tp", "2", "--accelerator", "cpu", "--port", "0", "--max-batch-size", "4")
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: request(port, "POST", "/v1/completions", {
                "prompt": p, "max_tokens": 10, "temperature": 0, "stream": True}), PROMPTS))
        bad = request(port, "POST", "/v1/completions", {"prompt": "x", "top_k": -1})
        health = request(port, "GET", "/health")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    texts = ["".join(e["choices"][0]["text"] for e in events) for _, events, _ in answers]
    assert texts == expected_texts(10)
    assert bad[0] == 400 and "top_k" in bad[1]["error"]["message"]
    assert health[0] == 200


@pytest.mark.slow
def test_serve_logs_a_client_that_goes_away_in_one_line_and_stops_at_once_on_sigterm(tmp_path):
    import json
    import socket

    log = tmp_path / "serve.log"
    process, port = start_serving(log, sys.executable, "-m", "lightning_megatron", "serve", "--config", str(RECIPE),
                                  "--port", "0")
    try:
        body = json.dumps({"prompt": "In the beginning", "max_tokens": 100, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port)) as client:  # reads the first event, then hangs up
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            client.recv(256)
        time.sleep(2)
        assert request(port, "GET", "/health")[0] == 200  # still serving
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        stopped = time.monotonic() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    assert len([line for line in output.splitlines() if "the client disconnected" in line]) == 1, output[-3000:]
    assert stopped < 2.0, f"{stopped:.2f} s from SIGTERM to exit"
