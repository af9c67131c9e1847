"""The OpenAI-compatible server over real HTTP on 127.0.0.1: concurrent streams, chat, errors, health, metrics,
log probabilities (echo, top_logprobs), stream usage, tokenizer endpoints, disconnects."""

import http.client
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from generation_helpers import cpu_process, ensure_parallel_state, tiny_gpt
from lightning_megatron.data import load_tokenizer
from lightning_megatron.data.tokenizer import Tokenizer
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

        def run(work, served_tokenizer=None):
            ensure_parallel_state()
            engine = build_engine(model, served_tokenizer or tokenizer, max_batch_size=8, leader_submits=True,
                                  cache_length=128)
            server = Server(engine, served_tokenizer or tokenizer, port=0, default_max_tokens=8)
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


TEXT = "In the beginning God created the heaven and the earth."


def forward_logprobs(model, ids):
    """log_softmax of a direct forward pass over ``ids`` (one sequence, no cache, no engine)."""
    model.chunks[0].eval()
    with torch.no_grad():
        logits = model.chunks[0](torch.tensor([ids]), torch.arange(len(ids))[None], None)
    return logits[0, :, :4096].float().log_softmax(-1)


def test_echo_scores_the_prompt_as_a_forward_pass(served):
    run, model, tokenizer = served
    ids = tokenizer.encode(TEXT)

    def work(port):
        scored = request(port, "POST", "/v1/completions", {"prompt": TEXT, "echo": True, "max_tokens": 0,
                                                           "logprobs": 2})
        # What lm-evaluation-harness's local-completions sends for loglikelihood requests: token ids, batched.
        harness = request(port, "POST", "/v1/completions", {
            "model": "lightning-megatron", "prompt": [ids, ids[:5]], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True})
        generated = request(port, "POST", "/v1/completions", {"prompt": TEXT, "echo": True, "max_tokens": 4,
                                                              "logprobs": 2, "temperature": 0, "ignore_eos": True})
        return scored, harness, generated

    (scored, harness, generated), _ = run(work)
    reference = forward_logprobs(model, ids)
    expected = [reference[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    status, body, _ = scored
    assert status == 200, body
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == TEXT and "".join(logprobs["tokens"]) == TEXT and choice["finish_reason"] == "length"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
    for position, (token, top) in enumerate(zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:])):
        assert 2 <= len(top) <= 3 and token in top  # the two likeliest, and the prompt's own token
        assert max(top.values()) == pytest.approx(reference[position].max().item(), abs=1e-5)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                             "prompt_tokens_details": {"cached_tokens": 0}}

    status, body, _ = harness
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    for choice, prompt in zip(body["choices"], [ids, ids[:5]]):
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(prompt) + 1
        assert token_logprobs[1: len(prompt)] == pytest.approx(expected[: len(prompt) - 1], abs=1e-5)
        # lm-eval's greedy test: each continuation token's log probability is the largest of its alternatives
        greedy = [lp >= max(top.values()) for lp, top in zip(token_logprobs[1:-1], choice["logprobs"]["top_logprobs"][1:-1])]
        assert greedy == [reference[i].argmax().item() == prompt[i + 1] for i in range(len(prompt) - 1)]

    status, body, _ = generated
    offline = generate(model, TEXT, SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True),
                       tokenizer=tokenizer)[0]
    choice = body["choices"][0]
    assert choice["text"] == TEXT + offline.text
    assert choice["logprobs"]["token_logprobs"][len(ids):] == pytest.approx(offline.logprobs, abs=1e-5)
    for value, top in zip(offline.logprobs, choice["logprobs"]["top_logprobs"][len(ids):]):
        assert len(top) == 2 and max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the likeliest
    assert body["usage"]["completion_tokens"] == 4


def test_streams_carry_logprobs_echo_and_a_final_usage_chunk(served):
    run, model, tokenizer = served

    def work(port):
        usage = request(port, "POST", "/v1/completions", {
            "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 1})
        echo = request(port, "POST", "/v1/completions", {"prompt": "And", "echo": True, "stream": True,
                                                         "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        chat = request(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Who made the light?"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "stop": ["never"]})
        return usage, echo, chat

    (usage, echo, chat), _ = run(work)
    offline = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True),
                       tokenizer=tokenizer)[0]
    status, events, _ = usage
    assert status == 200
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {
        "prompt_tokens": len(tokenizer.encode(PROMPTS[0])), "completion_tokens": 5,
        "total_tokens": len(tokenizer.encode(PROMPTS[0])) + 5, "prompt_tokens_details": {"cached_tokens": 0}}
    assert all(e["usage"] is None for e in events[:-1])
    streamed = [lp for e in events[:-1] if e["choices"][0].get("logprobs")
                for lp in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(offline.logprobs, abs=1e-5)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == offline.text

    status, events, _ = echo
    completion = generate(model, "And", SamplingParams(max_new_tokens=3, ignore_eos=True), tokenizer=tokenizer)[0]
    assert events[0]["choices"][0]["text"] == "And"
    assert "".join(e["choices"][0]["text"] for e in events) == "And" + completion.text

    status, body, _ = chat
    prompt = "User: Who made the light?\nAssistant:"
    offline = generate(model, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True),
                       tokenizer=tokenizer)[0]
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["logprob"] for entry in content] == pytest.approx(offline.logprobs, abs=1e-5)
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["bytes"] == list(entry["token"].encode())
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)


def test_request_errors_name_the_clients_fields_and_unknown_models_are_404(served):
    run, _, _ = served
    cases = [
        ({"model": "gpt-4", "prompt": "a"}, 404, "model", "gpt-4"),
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "echo"),
        ({"prompt": "a", "max_tokens": 10_000}, 400, "max_tokens", "lower max_tokens to"),
        ({"prompt": "a", "max_completion_tokens": 10_000}, 400, "max_completion_tokens",
         "lower max_completion_tokens to"),
        ({"prompt": "a", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens", "min_tokens must not exceed max_tokens"),
        ({"prompt": "a", "logprobs": 50}, 400, "logprobs", "from 0 to 20"),
        ({"prompt": "a", "logprobs": 1, "beam_width": 2}, 400, "logprobs", "beam search"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream is true"),
        ({"prompt": "a", "add_bos": True}, 400, "add_bos", "no beginning-of-sequence token"),
        ({"prompt": "a", "top_p_reset_ids": ["."]}, 400, "top_p_reset_ids", "integers"),
        ({"prompt": "a", "echo": True, "logprobs": 1, "stream": True}, 400, "stream", "without streaming"),
    ]

    def work(port):
        answers = [request(port, "POST", "/v1/completions", body) for body, _, _, _ in cases]
        answers.append(request(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}))
        answers.append(request(port, "POST", "/v1/completions", {"model": "lightning-megatron", "prompt": "a",
                                                                 "max_tokens": 2}))
        return answers

    answers, _ = run(work)
    for (status, body, _), (_, want_status, param, words) in zip(answers, cases):
        assert status == want_status and body["error"]["param"] == param, body
        assert words in body["error"]["message"] and "max_new_tokens" not in body["error"]["message"]
    assert answers[0][1]["error"]["code"] == "model_not_found"
    chat, good = answers[len(cases):]
    assert chat[0] == 400 and chat[1]["error"]["param"] == "top_logprobs"
    assert good[0] == 200 and good[1]["model"] == "lightning-megatron"


def test_top_p_reset_ids_over_http_match_offline_sampling(served):
    run, model, tokenizer = served
    fields = dict(temperature=1.0, top_p=0.95, top_p_decay=0.3, top_p_min=0.01, seed=3, ignore_eos=True)
    free = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=10, **fields), tokenizer=tokenizer)[0]
    reset = [free.tokens[2]]  # the nucleus opens up again after the third token

    def work(port):
        return request(port, "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 10,
                                                         "top_p_reset_ids": reset, **fields})

    (status, body, _), _ = run(work)
    offline = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=10, top_p_reset_ids=reset, **fields),
                       tokenizer=tokenizer)[0]
    assert status == 200 and body["choices"][0]["text"] == offline.text


def bos_tokenizer(path):
    """A small BPE tokenizer with a beginning-of-sequence token ``<s>``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(PROMPTS * 20, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(path))
    return Tokenizer(path)


def test_add_bos_puts_the_tokenizers_bos_before_the_prompt(served, tmp_path):
    run, model, _ = served
    tokenizer = bos_tokenizer(tmp_path / "tokenizer.json")
    ids = tokenizer.encode(PROMPTS[0])

    def work(port):
        body = {"prompt": PROMPTS[0], "echo": True, "max_tokens": 3, "logprobs": 0, "temperature": 0,
                "ignore_eos": True}
        return request(port, "POST", "/v1/completions", {**body, "add_bos": True}), \
            request(port, "POST", "/v1/completions", body)

    (with_bos, without), _ = run(work, served_tokenizer=tokenizer)
    offline = generate(model, [tokenizer.bos] + ids, SamplingParams(max_new_tokens=3, ignore_eos=True),
                       tokenizer=tokenizer)[0]
    assert with_bos[1]["choices"][0]["logprobs"]["tokens"][0] == "<s>"
    assert with_bos[1]["usage"]["prompt_tokens"] == len(ids) + 1 and without[1]["usage"]["prompt_tokens"] == len(ids)
    assert with_bos[1]["choices"][0]["text"] == PROMPTS[0] + offline.text


def test_tokenizer_endpoints_serve_lm_evals_remote_tokenizer(served):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    run, _, tokenizer = served

    def work(port):
        base = f"http://127.0.0.1:{port}/v1/completions"
        remote = RemoteTokenizer(base)
        return (check_remote_tokenizer_support(base), remote.encode(TEXT), remote.decode(tokenizer.encode(TEXT)),
                remote.eos_token_id, remote.bos_token_id, request(port, "POST", "/tokenize", {"prompt": 3}))

    (supported, encoded, decoded, eos, bos, bad), _ = run(work)
    assert supported and encoded == tokenizer.encode(TEXT) and decoded == TEXT
    assert eos == tokenizer.eod and bos is None
    assert bad[0] == 400 and bad[1]["error"]["param"] == "prompt"


def test_a_client_leaving_is_one_log_line_and_cancels_its_generation(served, caplog):
    run, _, _ = served

    def leave(port, stream):
        body = json.dumps({"prompt": "And", "max_tokens": 50, "ignore_eos": True, "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            if stream:
                sock.recv(64)

    def generated(port):
        """Tokens generated so far, once no request runs."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = request(port, "GET", "/metrics")[1]
            if "lightning_megatron_running_requests 0" in text and "queue_depth 0" in text:
                break
            time.sleep(0.05)
        return int(re.search(r"generated_tokens_total (\d+)", text).group(1))

    def work(port):
        counts = []
        for stream in (True, False):
            before = generated(port)
            leave(port, stream)
            deadline = time.monotonic() + 60
            while caplog.text.count("disconnected") < len(counts) + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            counts.append(generated(port) - before)
        return counts, request(port, "POST", "/v1/completions", {"prompt": "And", "max_tokens": 2})

    with caplog.at_level(logging.INFO):
        (counts, (status, _, _)), _ = run(work)
    assert status == 200
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
    assert not [r for r in caplog.records if r.exc_info], "a disconnect logged a traceback"
    assert all(count < 50 for count in counts), f"an abandoned request was not cancelled: {counts} of 50 tokens"


def test_sessions_reuse_the_conversation_and_equal_the_whole_conversation(served):
    run, model, tokenizer = served
    greedy = {"temperature": 0, "ignore_eos": True, "max_tokens": 6}

    def work(port):
        first = request(port, "POST", "/v1/completions", {"prompt": PROMPTS[0], "session_id": "s1", **greedy})
        second = request(port, "POST", "/v1/completions", {"prompt": " And the earth", "session_id": "s1", **greedy})
        chat = [request(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": text}], "session_id": "c1", **greedy}) for text in ("Hi", "Why")]
        ended = request(port, "DELETE", "/v1/sessions/s1")
        again = request(port, "DELETE", "/v1/sessions/s1")
        fresh = request(port, "POST", "/v1/completions", {"prompt": " And the earth", "session_id": "s1", **greedy})
        return first, second, chat, ended, again, fresh

    (first, second, chat, ended, again, fresh), _ = run(work)
    whole_ids = tokenizer.encode(PROMPTS[0])
    whole_ids += generate(model, PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True),
                          tokenizer=tokenizer)[0].tokens
    whole_ids += tokenizer.encode(" And the earth")
    expected = generate(model, whole_ids, SamplingParams(max_new_tokens=6, ignore_eos=True), tokenizer=tokenizer)[0]
    assert second[0] == 200 and second[1]["choices"][0]["text"] == expected.text
    usage = second[1]["usage"]
    assert usage["prompt_tokens"] == len(whole_ids)
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(whole_ids) - len(tokenizer.encode(" And the earth")) - 1
    assert first[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert chat[1][0] == 200 and chat[1][1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert ended[0] == 200 and ended[1]["deleted"] is True
    assert again[0] == 404 and again[1]["error"]["param"] == "session_id"
    assert fresh[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_session_request_errors(served):
    run, _, _ = served

    def work(port):
        return [request(port, "POST", "/v1/completions", body) for body in (
            {"prompt": ["a", "b"], "session_id": "x"},
            {"prompt": "a", "session_id": 5},
            {"prompt": "a", "session_id": "y", "beam_width": 2, "temperature": 0},
        )]

    replies, _ = run(work)
    assert [status for status, _, _ in replies] == [400, 400, 400]
    assert [body["error"]["param"] for _, body, _ in replies] == ["session_id", "session_id", "beam_width"]
