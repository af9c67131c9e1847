"""`lightning-megatron serve` over two real processes (tensor parallel, or two data-parallel replicas sharing the
requests), answering concurrent HTTP streams."""

import signal
from concurrent.futures import ThreadPoolExecutor
import re
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


@pytest.mark.slow
def test_serve_tp2_answers_concurrent_streams_and_shuts_down(tmp_path):
    log = open(tmp_path / "serve.log", "w+")
    with launch.serving(["--config", RECIPE, "--devices", 2, "--tp", 2, "--accelerator", "cpu", "--max-batch-size", 4],
                        log) as (process, port):
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: request(port, "POST", "/v1/completions", {
                "prompt": p, "max_tokens": 10, "temperature": 0, "stream": True}), PROMPTS))
        bad = request(port, "POST", "/v1/completions", {"prompt": "x", "top_k": -1})
        health = request(port, "GET", "/health")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, Path(log.name).read_text()[-3000:]
    texts = ["".join(e["choices"][0]["text"] for e in events) for _, events, _ in answers]
    assert texts == expected_texts(10)
    assert bad[0] == 400 and "top_k" in bad[1]["error"]["message"]
    assert health[0] == 200


def concurrent_completions(port, prompts, stream):
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: request(port, "POST", "/v1/completions", {
            "prompt": p, "max_tokens": 10, "temperature": 0, "stream": stream}), prompts))


@pytest.mark.slow
def test_serve_two_replicas_share_concurrent_requests(tmp_path):
    prompts = PROMPTS + PROMPTS[:1]
    log = open(tmp_path / "serve.log", "w+")
    # --devices 2 with TP = PP = 1: two replicas of the model.
    with launch.serving(["--config", RECIPE, "--devices", 2, "--accelerator", "cpu", "--max-batch-size", 4],
                        log) as (process, port):
        streamed = concurrent_completions(port, prompts, stream=True)
        whole = concurrent_completions(port, prompts, stream=False)
        metrics = request(port, "GET", "/metrics")[1]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, Path(log.name).read_text()[-3000:]
    expected = expected_texts(10)
    expected = expected + expected[:1]
    assert ["".join(e["choices"][0]["text"] for e in events) for _, events, _ in streamed] == expected
    assert [body["choices"][0]["text"] for _, body, _ in whole] == expected
    routed = [int(re.search(rf'replica_requests_total{{replica="{r}"}} (\d+)', metrics).group(1)) for r in (0, 1)]
    assert sum(routed) == 2 * len(prompts) and min(routed) >= 2, routed  # each replica took its share
    assert 'lightning_megatron_replica_running_requests{replica="1"} 0' in metrics


@pytest.mark.slow
def test_serve_logs_a_client_that_goes_away_in_one_line_and_stops_at_once_on_sigterm(tmp_path):
    import json
    import socket
    import time

    log = open(tmp_path / "serve.log", "w+")
    with launch.serving(["--config", RECIPE], log) as (process, port):
        # Eight sequences of 100 tokens keep the server writing well past the moment the client hangs up, also on a
        # loaded machine where the client is scheduled late.
        body = json.dumps({"prompt": ["In the beginning"] * 8, "max_tokens": 100, "ignore_eos": True,
                           "stream": True}).encode()
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
    output = Path(log.name).read_text()
    assert "Traceback" not in output, output[-3000:]
    assert len([line for line in output.splitlines() if "the client disconnected" in line]) == 1, output[-3000:]
    assert stopped < 2.0, f"{stopped:.2f} s from SIGTERM to exit"
