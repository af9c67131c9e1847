"""The OpenAI-compatible server over real HTTP on 127.0.0.1: concurrent streams, chat, errors, health, metrics."""

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from generation_helpers import cpu_process, ensure_parallel_state, tiny_gpt
from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import SamplingParams, build_engine, generate
from lightning_megatron.serve import Server

PROMPTS = ["In the beginning God created", "And", "Blessed are the meek", "Thou shalt not"]


def request(port, method, path, body=None, raw=None):
    """(status, parsed JSON body or list of SSE payloads, content type)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        data = reply.read().decode()
        kind = reply.getheader("Content-Type", "")
        if kind.startswith("text/event-stream"):
            events = [line[len("data: "):] for line in data.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            return reply.status, [json.loads(e) for e in events[:-1]], kind
        return reply.status, (json.loads(data) if kind.startswith("application/json") else data), kind
    finally:
        connection.close()


@pytest.fixture(scope="module")
def served():
    """Run the server's engine loop in the main thread while ``work(port)`` makes requests from another."""
    with cpu_process():
        tokenizer = load_tokenizer(None)
        model = tiny_gpt("gpt2")

        def run(work):
            ensure_parallel_state()
            engine = build_engine(model, tokenizer, max_batch_size=8, leader_submits=True, cache_length=128)
            server = Server(engine, tokenizer, port=0, default_max_tokens=8)
            server.start()
            outcome = {}

            def client():
                try:
                    outcome["value"] = work(server.port)
                except BaseException as error:  # re-raised in the test's thread
                    outcome["error"] = error
                finally:
                    server.shutdown()

            thread = threading.Thread(target=client)
            thread.start()
            server.serve_forever()
            thread.join(timeout=300)
            if "error" in outcome:
                raise outcome["error"]
            return outcome["value"], server

        yield run, model, tokenizer


def test_concurrent_streaming_completions_match_offline_generation(served):
    run, model, tokenizer = served
    lengths = [12, 5, 16, 9]

    def work(port):
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            streams = list(pool.map(lambda i: request(port, "POST", "/v1/completions", {
                "prompt": PROMPTS[i], "max_tokens": lengths[i], "temperature": 0, "stream": True,
                "ignore_eos": True}), range(len(PROMPTS))))
        whole = request(port, "POST", "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0,
                                                          "ignore_eos": True, "logprobs": 1})
        metrics = request(port, "GET", "/metrics")
        return streams, whole, metrics

    (streams, whole, metrics), server = run(work)
    expected = [generate(model, p, SamplingParams(max_new_tokens=n, ignore_eos=True), tokenizer=tokenizer)[0]
                for p, n in zip(PROMPTS, lengths)]
    for (status, events, kind), want in zip(streams, expected):
        assert status == 200 and kind.startswith("text/event-stream")
        assert "".join(e["choices"][0]["text"] for e in events) == want.text
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert all(e["object"] == "text_completion" for e in events)
    assert server.metrics.peak_batch_size >= 2, "concurrent requests were not decoded in one batch"
    status, body, _ = whole
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [
        generate(model, p, SamplingParams(max_new_tokens=6, ignore_eos=True), tokenizer=tokenizer)[0].text
        for p in PROMPTS[:2]]
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 6
    assert body["usage"]["completion_tokens"] == 12
    status, text, _ = metrics
    assert status == 200 and "lightning_megatron_requests_total 5" in text
    assert "lightning_megatron_generated_tokens_total 54" in text and "queue_depth 0" in text


def test_chat_completions_plain_and_streamed(served):
    run, model, tokenizer = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the light?"}]

    def work(port):
        plain = request(port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 7,
                                                               "temperature": 0, "seed": 1})
        streamed = request(port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 7,
                                                                  "temperature": 0, "stream": True})
        return plain, streamed

    (plain, streamed), _ = run(work)
    status, body, _ = plain
    assert status == 200 and body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    prompt = "System: Be brief.\nUser: Who made the light?\nAssistant:"
    offline = generate(model, prompt, SamplingParams(max_new_tokens=7, stop=["\nUser:"]), tokenizer=tokenizer)[0]
    assert message["content"] == offline.text
    status, events, _ = streamed
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == offline.text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(served):
    run, _, _ = served
    bad = [
        ({"raw": b"{not json"}, 400, None),
        ({"body": {"max_tokens": 4}}, 400, "prompt"),
        ({"body": {"prompt": "a", "temperature": -1}}, 400, None),
        ({"body": {"prompt": "a", "max_tokens": "ten"}}, 400, "max_tokens"),
        ({"body": {"prompt": "a", "max_tokens": 10_000}}, 400, None),
        ({"body": {"prompt": "a", "frobnicate": 1}}, 400, "frobnicate"),
        ({"body": {"prompt": "a", "beam_width": 2, "stream": True}}, 400, "stream"),
        ({"body": {"prompt": "a", "n": 3}}, 400, "n"),
        ({"body": {"prompt": [99999]}}, 400, None),
        ({"body": ["prompt"]}, 400, None),
        ({"body": {"prompt": "a", "stop_token_ids": ["x"]}}, 400, "stop_token_ids"),
    ]

    def work(port):
        answers = [request(port, "POST", "/v1/completions", kwargs.get("body"), kwargs.get("raw"))
                   for kwargs, _, _ in bad]
        answers.append(request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "robot",
                                                                                    "content": "hi"}]}))
        answers.append(request(port, "GET", "/v1/completions"))
        answers.append(request(port, "GET", "/nowhere"))
        answers.append(request(port, "GET", "/health"))
        answers.append(request(port, "POST", "/v1/completions", {"prompt": "And", "max_tokens": 3}))
        return answers

    answers, server = run(work)
    for (status, body, _), (_, want_status, param) in zip(answers, bad):
        assert status == want_status, body
        assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
        if param:
            assert body["error"]["param"] == param
    chat, wrong_method, missing, health, good = answers[len(bad):]
    assert chat[0] == 400 and "role" in chat[1]["error"]["message"]
    assert wrong_method[0] == 405 and missing[0] == 404
    assert health[0] == 200 and health[1]["status"] == "ok"
    assert good[0] == 200 and good[1]["usage"]["completion_tokens"] <= 3
    assert server.metrics.requests_failed == len(bad) + 1


def test_server_listens_on_loopback_only(served):
    _, model, tokenizer = served
    with pytest.raises(ValueError, match="loopback"):
        Server(build_engine(model, tokenizer), tokenizer, host="0.0.0.0")
