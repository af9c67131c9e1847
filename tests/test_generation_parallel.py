"""Generation under tensor, pipeline and context parallelism (real gloo processes) gives what one process gives."""

import json

import pytest

from launch import REPO, read_json, run_python, torchrun

CLI = REPO / "lightning_megatron" / "cli.py"

KEYS = ["cached", "recomputed", "sampled_alone", "sampled_together", "beam1", "beam3", "beam3_recomputed", "sample",
        "session", "session_cached", "scored", "prompt_top", "generated_top"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    run_python("generate_gpt.py", "--out", root / "ref.json", "--save-ckpt", root / "model.ckpt",
               "--predict-out", root / "predicted.jsonl", timeout=400)
    return read_json(root / "ref.json"), root / "model.ckpt", root / "predicted.jsonl"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_internal(result):
    assert result["cached"] == result["recomputed"], "KV-cache decoding differs from recomputation"
    assert result["beam1"] == result["cached"], "beam width 1 differs from greedy"
    assert result["beam3"] == result["beam3_recomputed"]
    assert result["sampled_alone"] == result["sampled_together"], "a seeded sample depends on its batch"
    assert result["session"] == result["session_whole"], "a session's follow-up differs from the whole conversation"
    assert result["session_cached"] > 0
    assert len({t for tokens in result["cached"] for t in tokens}) > 8
    assert result["scored"] == [tokens[:4] for tokens in result["cached"]]  # scoring does not change what is generated
    assert [top[0] for top in result["generated_top"][0]] == result["scored"][0]  # greedy: the likeliest token
    for cached, recomputed in zip(result["prompt_logprobs"], result["prompt_logprobs_recomputed"]):
        assert cached == pytest.approx(recomputed, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_sp", "pp2_vp2", "cp2"])
def test_parallel_generation_matches_one_process(reference, tmp_path, layout):
    ref, _, ref_predicted = reference
    check_internal(ref)
    args = {"tp2_sp": ["--tp", 2, "--sp"], "cp2": ["--cp", 2],
            "pp2_vp2": ["--pp", 2, "--vp", 2, "--predict-out", tmp_path / "p.jsonl"]}[layout]
    torchrun("generate_gpt.py", 2, "--out", tmp_path / "out.json", "--devices", 2, *args, timeout=400)
    result = read_json(tmp_path / "out.json")
    check_internal(result)
    for key in KEYS:
        assert result[key] == ref[key], f"{layout}: {key} differs from one process"
    assert result["beam3_logprob"] == pytest.approx(ref["beam3_logprob"], abs=1e-3)
    for ours, one_process in zip(result["prompt_logprobs"], ref["prompt_logprobs"]):
        assert ours == pytest.approx(one_process, abs=1e-4)
    if layout == "pp2_vp2":  # trainer.predict over a prompts file: one record per prompt, in order, on rank 0
        records, expected = read_jsonl(tmp_path / "p.jsonl"), read_jsonl(ref_predicted)
        assert [r["id"] for r in records] == [0, 1, 2] and len(records[0]["tokens"]) == 12
        assert [(r["prompt"], r["tokens"], r["completion"]) for r in records] == [
            (r["prompt"], r["tokens"], r["completion"]) for r in expected]


@pytest.fixture(scope="module")
def alibi_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("alibi") / "ref.json"
    run_python("generate_gpt.py", "--out", out, "--arch", "alibi", timeout=400)
    return read_json(out)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_sp", "cp2"])
def test_alibi_trains_and_generates_as_one_process(alibi_reference, tmp_path, layout):
    """ALiBi (6 heads, BLOOM-style model): TP ranks add their own heads' slopes, CP ranks use global positions."""
    check_internal(alibi_reference)
    args = {"tp2_sp": ["--tp", 2, "--sp"], "cp2": ["--cp", 2]}[layout]
    torchrun("generate_gpt.py", 2, "--out", tmp_path / "out.json", "--devices", 2, "--arch", "alibi", *args,
             timeout=400)
    result = read_json(tmp_path / "out.json")
    for key in KEYS:
        assert result[key] == alibi_reference[key], f"{layout}: {key} differs from one process"


@pytest.mark.slow
def test_generate_cli_reproduces_the_trained_models_greedy_text(reference, tmp_path):
    ref, ckpt, _ = reference
    out = tmp_path / "completions.jsonl"
    prompts = ["In the beginning God", "And the LORD said unto Moses,", "Blessed"]
    args = ["--ckpt", ckpt, "--max-new-tokens", 12, "--output", out, "--accelerator", "cpu"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    run_python(CLI, "generate", *args, timeout=400)
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == prompts
    assert [r["tokens"] for r in records] == ref["cached"]
    assert [r["completion"] for r in records] == ref["cached_text"]
    # The sharded checkpoint reshards on load: TP=2 generates the same tokens.
    out_tp = tmp_path / "completions-tp2.jsonl"
    run_python(CLI, "generate", *[a if a != out else out_tp for a in args], "--devices", 2, "--tp", 2, timeout=400)
    assert [r["tokens"] for r in read_jsonl(out_tp)] == ref["cached"]
    # Two data-parallel replicas share the three prompts (2 + 1): the same completions, in prompt order.
    out_dp = tmp_path / "completions-dp2.jsonl"
    run_python(CLI, "generate", *[a if a != out else out_dp for a in args], "--devices", 2, timeout=400)
    records_dp = read_jsonl(out_dp)
    without_logprob = [[{**r, "cumulative_logprob": None} for r in rs] for rs in (records_dp, records)]
    assert without_logprob[0] == without_logprob[1]
    # Smaller batches change float rounding, not tokens.
    assert [r["cumulative_logprob"] for r in records_dp] == pytest.approx([r["cumulative_logprob"] for r in records])


@pytest.mark.slow
def test_a_bad_prompt_in_one_replica_stops_every_replica():
    # The second prompt (too long for the model) goes to replica 1; replica 0 raises its error too, instead of
    # waiting for its results (NCCL: until a timeout; gloo: until the connection to the failed process drops).
    result = run_python(CLI, "generate", "--config", REPO / "recipes" / "gpt-tiny.yaml", "--prompt", "In the",
                        "--prompt", "word " * 300, "--max-new-tokens", 4, "--devices", 2, "--accelerator", "cpu",
                        check=False, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: the prompt has 302 tokens")]
    assert len(errors) == 1 and "the model reads at most 127 to leave room for one new token" in errors[0]
    assert "Traceback" not in result.stderr and "Connection closed" not in result.stderr


def test_generate_refuses_a_layout_that_cannot_split_the_devices():
    result = run_python(CLI, "generate", "--config", REPO / "recipes" / "gpt-tiny.yaml", "--prompt", "x",
                        "--devices", 3, "--tp", 2, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "lightning-megatron generate: error: --devices 3 is not a multiple of --tp x --pp = 2: each replica of the "
        "model takes tp x pp processes")

