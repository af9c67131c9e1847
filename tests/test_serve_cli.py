"""`lightning-megatron serve` over two real processes (tensor parallel, or two data-parallel replicas sharing the
requests), answering concurrent HTTP streams."""

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


def serve(tmp_path, *layout, work):
    """Run ``serve`` on two CPU processes with ``layout`` flags, call ``work(port)``, stop it with SIGINT."""
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, str(launch.REPO / "lightning_megatron" / "cli.py"), "serve", "--config", str(RECIPE),
         "--devices", "2", *layout, "--accelerator", "cpu", "--port", "0", "--max-batch-size", "4"],
        stdout=log, stderr=subprocess.STDOUT, env=launch.child_env(), cwd=launch.REPO, start_new_session=True)
    try:
        port = None
        deadline = time.monotonic() + 300
        while port is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            match = re.search(r"Serving \S+ on http://127\.0\.0\.1:(\d+)", Path(log.name).read_text())
            port = int(match.group(1)) if match else None
        assert port is not None, Path(log.name).read_text()[-3000:]
        result = work(port)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, Path(log.name).read_text()[-3000:]
        return result
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def concurrent_completions(port, prompts, stream):
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: request(port, "POST", "/v1/completions", {
            "prompt": p, "max_tokens": 10, "temperature": 0, "stream": stream}), prompts))


@pytest.mark.slow
def test_serve_tp2_answers_concurrent_streams_and_shuts_down(tmp_path):
    def work(port):
        answers = concurrent_completions(port, PROMPTS, stream=True)
        return answers, request(port, "POST", "/v1/completions", {"prompt": "x", "top_k": -1}), \
            request(port, "GET", "/health")

    answers, bad, health = serve(tmp_path, "--tp", "2", work=work)
    texts = ["".join(e["choices"][0]["text"] for e in events) for _, events, _ in answers]
    assert texts == expected_texts(10)
    assert bad[0] == 400 and "top_k" in bad[1]["error"]["message"]
    assert health[0] == 200


@pytest.mark.slow
def test_serve_two_replicas_share_concurrent_requests(tmp_path):
    prompts = PROMPTS + PROMPTS[:1]

    def work(port):
        streamed = concurrent_completions(port, prompts, stream=True)
        whole = concurrent_completions(port, prompts, stream=False)
        return streamed, whole, request(port, "GET", "/metrics")[1]

    streamed, whole, metrics = serve(tmp_path, work=work)  # --devices 2, TP = PP = 1: two replicas
    expected = expected_texts(10)
    expected = expected + expected[:1]
    assert ["".join(e["choices"][0]["text"] for e in events) for _, events, _ in streamed] == expected
    assert [body["choices"][0]["text"] for _, body, _ in whole] == expected
    routed = [int(re.search(rf'replica_requests_total{{replica="{r}"}} (\d+)', metrics).group(1)) for r in (0, 1)]
    assert sum(routed) == 2 * len(prompts) and min(routed) >= 2, routed  # each replica took its share
    assert 'lightning_megatron_replica_running_requests{replica="1"} 0' in metrics
