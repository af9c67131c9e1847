"""Generation in one process: cache vs recompute, batching, continuous batching, sampling controls, beams, streams."""

import pytest
import torch

from generation_helpers import cpu_process, ensure_parallel_state, tiny_gpt
from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import SamplingParams, TextStreamer, build_engine, generate

PROMPTS = ["In the beginning God created", "And", "Blessed are the meek: for they shall"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def models():
    with cpu_process():
        yield {"gpt2": tiny_gpt("gpt2"), "llama": tiny_gpt("llama"), "gpt2-local": tiny_gpt("gpt2", attention="local"),
               "alibi": tiny_gpt("alibi")}


@pytest.fixture
def gpt(models):
    ensure_parallel_state()
    return models["gpt2"]


def tokens_of(outputs):
    return [o.tokens for o in outputs]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt2-local", "alibi"])
def test_kv_cache_decoding_equals_recompute(models, tokenizer, arch):
    ensure_parallel_state()
    params = SamplingParams(max_new_tokens=16, logprobs=True, ignore_eos=True)
    cached = generate(models[arch], PROMPTS, params, tokenizer=tokenizer)
    recomputed = generate(models[arch], PROMPTS, params, tokenizer=tokenizer, use_cache=False)
    assert tokens_of(cached) == tokens_of(recomputed)
    assert len({t for o in cached for t in o.tokens}) > 8, "degenerate model: the comparison would prove little"
    for a, b in zip(cached, recomputed):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.cumulative_logprob == pytest.approx(sum(a.logprobs), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama", "alibi"])
def test_compiled_decoding_is_one_graph_and_equals_eager(models, tokenizer, arch):
    ensure_parallel_state()
    params = SamplingParams(max_new_tokens=12, logprobs=True, ignore_eos=True)
    engine = build_engine(models[arch], tokenizer, max_batch_size=len(PROMPTS), compile=True)
    compiled = engine.generate(PROMPTS, [params] * len(PROMPTS))
    eager = generate(models[arch], PROMPTS, params, tokenizer=tokenizer)
    assert tokens_of(compiled) == tokens_of(eager)
    for a, b in zip(compiled, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # A graph break splits the step into pieces that cannot fuse (what made compiled decoding slow before).
    runner = engine.runner
    with runner.inference_mode():
        explained = torch._dynamo.explain(runner._decode_step)(2, 16)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_mixed_lengths_in_one_batch_equal_each_alone(gpt, tokenizer):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    together = generate(gpt, PROMPTS, params, tokenizer=tokenizer)
    alone = [generate(gpt, p, params, tokenizer=tokenizer)[0] for p in PROMPTS]
    assert tokens_of(together) == tokens_of(alone)
    assert [o.text for o in together] == [tokenizer.decode(o.tokens) for o in together]


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-local", "alibi"])
def test_continuous_batching_requests_join_and_leave(models, tokenizer, arch):
    ensure_parallel_state()
    gpt = models[arch]
    short = SamplingParams(max_new_tokens=3, ignore_eos=True)
    long = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine = build_engine(gpt, tokenizer, max_batch_size=2)
    with engine.runner.inference_mode():
        first = engine.submit(PROMPTS[0], long)
        second = engine.submit(PROMPTS[2], short)
        third = engine.submit(PROMPTS[1], long)  # waits for a free slot, joins while `first` still runs
        joined_while_running = False
        while engine.busy:
            engine.step()
            running = {r.id for r in engine.active}
            joined_while_running |= {first, third} <= running
    assert joined_while_running
    results = {i: engine.finished.pop(i).tokens for i in (first, second, third)}
    for request_id, prompt, params in ((first, PROMPTS[0], long), (second, PROMPTS[2], short),
                                       (third, PROMPTS[1], long)):
        assert results[request_id] == generate(gpt, prompt, params, tokenizer=tokenizer)[0].tokens


def test_seeded_sampling_is_reproducible_and_batch_independent(gpt, tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=100, top_p=0.95, seed=11, ignore_eos=True)
    once = generate(gpt, PROMPTS[0], params, tokenizer=tokenizer)[0].tokens
    again = generate(gpt, PROMPTS[0], params, tokenizer=tokenizer)[0].tokens
    in_batch = generate(gpt, PROMPTS, [params.replace(seed=5), params, params.replace(seed=6)],
                        tokenizer=tokenizer)[1].tokens
    other_seed = generate(gpt, PROMPTS[0], params.replace(seed=12), tokenizer=tokenizer)[0].tokens
    assert once == again
    assert generate(gpt, PROMPTS[1], params, tokenizer=tokenizer)[0].tokens == in_batch
    assert once != other_seed


def test_top_k_one_and_tiny_top_p_are_greedy(gpt, tokenizer):
    greedy = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True), tokenizer=tokenizer)
    for params in (SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, ignore_eos=True, seed=1),
                   SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, ignore_eos=True, seed=1),
                   SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_p_decay=0.01, top_p_min=1e-6,
                                  ignore_eos=True, seed=1)):
        sampled = generate(gpt, PROMPTS[0], params, tokenizer=tokenizer)
        if params.top_p_decay < 1.0:  # only the first token is sampled from a wide nucleus
            assert sampled[0].tokens[1:] == generate(
                gpt, tokenizer.encode(PROMPTS[0]) + sampled[0].tokens[:1],
                SamplingParams(max_new_tokens=7, ignore_eos=True))[0].tokens
        else:
            assert sampled[0].tokens == greedy[0].tokens


def test_stop_strings_and_stop_tokens(gpt, tokenizer):
    free = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=16, ignore_eos=True), tokenizer=tokenizer)[0]
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    stopped = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=16, stop=[stop], ignore_eos=True),
                       tokenizer=tokenizer)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.tokens == free.tokens[: len(stopped.tokens)] and len(stopped.tokens) < len(free.tokens)

    token = free.tokens[4]
    by_token = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=16, stop_token_ids=[token], ignore_eos=True),
                        tokenizer=tokenizer)[0]
    assert by_token.tokens == free.tokens[: free.tokens.index(token) + 1]
    assert by_token.finish_reason == "stop"
    assert free.finish_reason == "length" and free.length == 16


def test_min_tokens_bad_words_and_repetition_penalty(gpt, tokenizer):
    free = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True), tokenizer=tokenizer)[0]
    banned = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=8, bad_word_ids=[[free.tokens[0]]],
                                                      ignore_eos=True), tokenizer=tokenizer)[0]
    assert free.tokens[0] not in banned.tokens
    ended = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=8, stop_token_ids=[free.tokens[0]],
                                                     min_new_tokens=3, ignore_eos=True), tokenizer=tokenizer)[0]
    assert free.tokens[0] not in ended.tokens[:3]
    penalised = generate(gpt, PROMPTS[0], SamplingParams(max_new_tokens=16, repetition_penalty=50.0,
                                                         ignore_eos=True), tokenizer=tokenizer)[0]
    prompt = set(tokenizer.encode(PROMPTS[0]))
    assert len(set(penalised.tokens)) == len(penalised.tokens) and not prompt & set(penalised.tokens)


def test_beam_search(gpt, tokenizer):
    greedy = generate(gpt, PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True), tokenizer=tokenizer)
    beam1 = generate(gpt, PROMPTS, SamplingParams(max_new_tokens=10, beam_width=1, ignore_eos=True),
                     tokenizer=tokenizer)
    assert tokens_of(beam1) == tokens_of(greedy)
    beam4 = SamplingParams(max_new_tokens=6, beam_width=4, length_penalty=0.0, ignore_eos=True)
    cached = generate(gpt, PROMPTS, beam4, tokenizer=tokenizer)
    recomputed = generate(gpt, PROMPTS, beam4, tokenizer=tokenizer, use_cache=False)
    assert tokens_of(cached) == tokens_of(recomputed)
    # Two steps of width 3 must find the best pair among the 3 likeliest first tokens: check it by brute force.
    prompt = tokenizer.encode(PROMPTS[0])
    one = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=True)
    firsts, banned = [], []
    for _ in range(3):
        out = generate(gpt, prompt, one.replace(bad_word_ids=[[t] for t in banned]))[0]
        banned.append(out.tokens[0])
        # Banning changes nothing but the banned logits, so the chosen token's log probability is the model's.
        firsts.append((out.tokens[0], out.logprobs[0]))
    pairs = []
    for token, logprob in firsts:
        nxt = generate(gpt, prompt + [token], one)[0]
        pairs.append((logprob + nxt.logprobs[0], [token, nxt.tokens[0]]))
    best_score, best_pair = max(pairs)
    beam = generate(gpt, prompt, SamplingParams(max_new_tokens=2, beam_width=3, length_penalty=0.0,
                                                ignore_eos=True))[0]
    assert beam.tokens == best_pair
    assert beam.cumulative_logprob == pytest.approx(best_score, abs=1e-4)
    assert cached[0].text == tokenizer.decode(cached[0].tokens)


def test_streaming_pieces_add_up_to_the_text(gpt, tokenizer):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine = build_engine(gpt, tokenizer)
    events = list(engine.stream(PROMPTS[0], params))
    assert len(events) == 12 and events[-1].finished and not any(e.finished for e in events[:-1])
    final = generate(gpt, PROMPTS[0], params, tokenizer=tokenizer)[0]
    assert "".join(e.text for e in events) == final.text
    printed = []
    generate(gpt, PROMPTS[0], params, tokenizer=tokenizer, streamer=TextStreamer(on_text=printed.append))
    assert "".join(printed) == final.text + "\n"


def test_invalid_requests_raise_clear_errors(gpt, tokenizer):
    engine = build_engine(gpt, tokenizer)
    with pytest.raises(ValueError, match="lower max_new_tokens to 14"):
        engine.submit(list(range(50)), SamplingParams(max_new_tokens=30))
    with pytest.raises(ValueError, match="reads at most 63"):
        engine.submit(list(range(64)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="token ids must lie"):
        engine.submit([5000], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.submit("a", SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="beam search"):
        engine.submit("a", SamplingParams(beam_width=2, stop=["x"]))
    assert not engine.busy


def test_generate_takes_the_model(gpt, tokenizer):
    out = generate(gpt, "In the beginning", SamplingParams(max_new_tokens=5, ignore_eos=True), tokenizer=tokenizer)
    assert len(out) == 1 and out[0].length == 5 and out[0].prompt_tokens == tokenizer.encode("In the beginning")
    ids = generate(gpt, [tokenizer.encode("And")], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert ids[0].text is None and ids[0].length == 4
    assert torch.is_grad_enabled() and all(chunk.training for chunk in gpt.chunks)


def complete(engine, prompt, params, session=None):
    with engine.runner.inference_mode():
        request_id = engine.submit(prompt, params, session_id=session)
        while request_id not in engine.finished:
            engine.step()
    return engine.finished.pop(request_id)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "alibi"])
def test_a_session_continues_from_its_cache_exactly_as_the_whole_conversation(models, tokenizer, arch):
    ensure_parallel_state()
    gpt = models[arch]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = build_engine(gpt, tokenizer, max_batch_size=2)
    first = complete(engine, PROMPTS[0], params, session="chat")
    follow_up = tokenizer.encode(" And the earth")
    # Another conversation runs beside it, so the follow-up joins a running batch at another cache position.
    other = engine.submit(PROMPTS[2], params.replace(max_new_tokens=12))
    with engine.runner.inference_mode():
        engine.step()
    second = complete(engine, follow_up, params, session="chat")
    whole = tokenizer.encode(PROMPTS[0]) + first.tokens + follow_up
    assert second.prompt_tokens == whole
    assert second.cached_tokens == len(whole) - len(follow_up) - 1  # all but the last generated token
    assert second.tokens == generate(gpt, whole, params, tokenizer=tokenizer)[0].tokens
    third = complete(engine, tokenizer.encode(" was"), params, session="chat")
    assert third.cached_tokens == len(whole) + len(second.tokens) - 1
    assert third.tokens == generate(gpt, whole + second.tokens + tokenizer.encode(" was"), params)[0].tokens
    with engine.runner.inference_mode():
        while other not in engine.finished:
            engine.step()


def test_sessions_end_explicitly_by_idle_time_and_by_memory(gpt, tokenizer):
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine = build_engine(gpt, tokenizer, max_batch_size=2, session_tokens=12)
    complete(engine, PROMPTS[0], params, session="a")
    assert complete(engine, "And", params, session="a").cached_tokens > 0
    engine.end_session("a")
    assert complete(engine, "And", params, session="a").cached_tokens == 0  # ended: a new conversation
    complete(engine, PROMPTS[2], params, session="b")  # a and b together exceed 12 cached tokens: a goes
    assert set(engine.sessions) == {"b"}
    engine.sessions.ttl = 0.0
    with engine.runner.inference_mode():
        engine.step()
        engine.step()
    assert not engine.sessions


def test_a_busy_session_and_beam_sessions_are_refused(gpt, tokenizer):
    engine = build_engine(gpt, tokenizer)
    engine.submit("In the beginning", SamplingParams(max_new_tokens=4), session_id="s")
    with pytest.raises(ValueError, match="has a request running"):
        engine.submit("And", SamplingParams(max_new_tokens=4), session_id="s")
    with pytest.raises(ValueError, match="beam search cannot continue a session"):
        engine.submit("And", SamplingParams(max_new_tokens=4, beam_width=2), session_id="t")
    with pytest.raises(ValueError, match="need the engine's cache"):
        build_engine(gpt, tokenizer, use_cache=False).submit("And", session_id="u")


def run_engine(engine, requests, steps_ahead=None):
    """Submit ``(prompt, params, session)`` requests, the later ones after the first step (they join a running
    batch); step to the end. Returns the outputs in order; counts the steps that were launched ahead."""
    with engine.runner.inference_mode():
        ids = [engine.submit(p, params, session_id=s) for p, params, s in requests[:1]]
        engine.step()
        ids += [engine.submit(p, params, session_id=s) for p, params, s in requests[1:]]
        while engine.busy:
            engine.step()
            if steps_ahead is not None:
                steps_ahead.append(engine._in_flight is not None)
    return [engine.finished.pop(i) for i in ids]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lookahead_gives_the_tokens_of_the_plain_loop(models, tokenizer, arch):
    ensure_parallel_state()
    gpt = models[arch]
    free = generate(gpt, [PROMPTS[0], PROMPTS[2]], SamplingParams(max_new_tokens=16, ignore_eos=True),
                    tokenizer=tokenizer)
    greedy = SamplingParams(max_new_tokens=14, ignore_eos=True, logprobs=True)
    requests = [
        (PROMPTS[0], greedy.replace(stop=[free[0].text[6:9]]), None),  # ends on a stop string mid-batch
        (PROMPTS[1], SamplingParams(max_new_tokens=9, temperature=0.8, top_k=50, top_p=0.9, seed=3,
                                    repetition_penalty=1.3, frequency_penalty=0.5, bad_word_ids=[[free[0].tokens[1]]],
                                    ignore_eos=True), None),
        (PROMPTS[2], greedy.replace(min_new_tokens=2, stop_token_ids=[free[1].tokens[5]]), None),
        (PROMPTS[1], greedy.replace(max_new_tokens=3), None),  # waits for a slot, joins later
        (PROMPTS[0], greedy.replace(max_new_tokens=5), "chat"),
    ]
    plain = run_engine(build_engine(gpt, tokenizer, max_batch_size=3, lookahead=False), requests)
    ahead = []
    engine = build_engine(gpt, tokenizer, max_batch_size=3, lookahead=True)
    looked = run_engine(engine, requests, ahead)
    assert sum(ahead) >= 8, "lookahead never ran: the comparison proves nothing"
    for a, b in zip(looked, plain):
        assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    assert looked[0].finish_reason == "stop" and looked[2].finish_reason == "stop"
    # The session kept every token but its last, though the clock had run a step ahead when it ended.
    follow_up = tokenizer.encode(" And the earth")
    second = run_engine(engine, [(follow_up, greedy.replace(max_new_tokens=4), "chat")])[0]
    whole = tokenizer.encode(PROMPTS[0]) + looked[4].tokens + follow_up
    assert second.cached_tokens == len(whole) - len(follow_up) - 1
    assert second.tokens == generate(gpt, whole, greedy.replace(max_new_tokens=4))[0].tokens


def test_lookahead_needs_a_cache(gpt, tokenizer):
    with pytest.raises(ValueError, match="lookahead=True needs the cache"):
        build_engine(gpt, tokenizer, use_cache=False, lookahead=True)


def test_beam_diversity_spreads_the_beams_over_their_parents():
    from lightning_megatron.generation.sampling import beam_step

    logprobs = torch.log_softmax(torch.tensor([[5.0, 4.9, 4.8, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0],
                                               [1.0, 0.0, 0.0, 0.0, 0.0]]), dim=-1)
    plain = beam_step(logprobs, [0.0, -1.0, -1.5], frozenset(), 3)
    diverse = beam_step(logprobs, [0.0, -1.0, -1.5], frozenset(), 3, diversity_rate=10.0)
    assert plain.parents == [0, 0, 0] and plain.tokens == [0, 1, 2]
    assert diverse.parents == [0, 1, 2] and diverse.tokens == [0, 0, 0]
    assert diverse.scores[1] == pytest.approx(logprobs[1, 0].item() - 1.0)  # penalties order, never score


def forward_logprobs(model, ids):
    """log_softmax of a direct forward pass over ``ids`` (one sequence, no cache, no engine)."""
    model.chunks[0].eval()
    with torch.no_grad():
        logits = model.chunks[0](torch.tensor([ids]), torch.arange(len(ids))[None], None)
    return logits[0, :, :4096].float().log_softmax(-1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_logprobs_equal_a_forward_pass(gpt, tokenizer, use_cache):
    """Scored with others of different lengths, and while other requests decode (continuous batching)."""
    engine = build_engine(gpt, tokenizer, max_batch_size=4, use_cache=use_cache)
    scored = SamplingParams(max_new_tokens=0, prompt_logprobs=3)
    with engine.runner.inference_mode():
        running = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
        for _ in range(8):
            engine.step()
        late = engine.submit(PROMPTS[2], scored)  # joins the running batch, after a cache row's leftovers
        engine.step()
        assert late in engine.finished and running not in engine.finished
        while engine.busy:
            engine.step()
    batch = generate(gpt, PROMPTS, scored, tokenizer=tokenizer, use_cache=use_cache)
    outputs = [*batch, engine.finished.pop(late)]
    assert engine.finished.pop(running).length == 20
    for output, prompt in zip(outputs, [*PROMPTS, PROMPTS[2]]):
        ids = tokenizer.encode(prompt)
        reference = forward_logprobs(gpt, ids)
        expected = [reference[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        assert output.tokens == [] and output.finish_reason == "length"
        assert output.prompt_logprobs[0] is None and output.prompt_top_logprobs[0] is None
        assert output.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-5)
        for position, top in enumerate(output.prompt_top_logprobs[1:]):
            values, indices = reference[position].topk(3)
            assert list(top) == indices.tolist()
            assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)


def test_generated_top_logprobs_and_prompt_scores_alongside_generation(gpt, tokenizer):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=2, prompt_logprobs=0)
    output = generate(gpt, PROMPTS[1], params, tokenizer=tokenizer)[0]
    plain = generate(gpt, PROMPTS[1], SamplingParams(max_new_tokens=6, ignore_eos=True), tokenizer=tokenizer)[0]
    assert output.tokens == plain.tokens and output.top_logprobs is not None and len(output.top_logprobs) == 6
    ids = tokenizer.encode(PROMPTS[1]) + output.tokens
    reference = forward_logprobs(gpt, ids)
    start = len(tokenizer.encode(PROMPTS[1])) - 1
    for step, (token, logprob, top) in enumerate(zip(output.tokens, output.logprobs, output.top_logprobs)):
        values, indices = reference[start + step].topk(2)
        assert list(top) == indices.tolist() and token == indices[0].item()  # greedy: the likeliest token
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
        assert logprob == pytest.approx(values[0].item(), abs=1e-5)
    assert output.prompt_top_logprobs[1:] == [{}] * (len(ids) - len(output.tokens) - 1)
    events = list(build_engine(gpt, tokenizer).stream(PROMPTS[1], params))
    assert [e.top_logprobs for e in events] == output.top_logprobs
    assert [e.logprob for e in events] == pytest.approx(output.logprobs, abs=1e-6)


def test_scoring_only_reads_the_whole_sequence_length(gpt, tokenizer):
    engine = build_engine(gpt, tokenizer)
    full = [int(t) for t in torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(0))]
    output = engine.generate([full], SamplingParams(max_new_tokens=0, prompt_logprobs=0))[0]
    reference = forward_logprobs(gpt, full)
    assert output.prompt_logprobs[1:] == pytest.approx([reference[i, full[i + 1]].item() for i in range(63)],
                                                       abs=1e-5)
    with pytest.raises(ValueError, match="64 when only scoring"):
        engine.submit(full, SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="top_logprobs are not kept for beam search"):
        engine.submit(full[:8], SamplingParams(beam_width=2, top_logprobs=1))
