"""Generation under tensor, pipeline and context parallelism (real gloo processes) gives what one process gives."""

import json

import pytest

import lightning_megatron  # noqa: F401  (imported before any capsys: Lightning's log handler keeps this stderr)
from launch import REPO, run_python, train_together
from lightning_megatron_cli import main

CLI = REPO / "lightning_megatron" / "cli.py"

KEYS = ["cached", "recomputed", "sampled_alone", "sampled_together", "beam1", "beam3", "beam3_recomputed", "sample",
        "session", "session_cached", "scored", "prompt_top", "generated_top"]


LAYOUTS = {"tp2_sp": ["--tp", 2, "--sp"], "pp2_vp2": ["--pp", 2, "--vp", 2], "cp2": ["--cp", 2]}
ALIBI_LAYOUTS = ["tp2_sp", "cp2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="module")
def references(root):
    """The single-process runs, in one launch: GPT-2 (saved for the CLI tests, with trainer.predict's completions)
    and ALiBi."""
    return train_together(root, 1, {
        "reference": ["--save-ckpt", root / "model.ckpt", "--predict-out", root / "predicted.jsonl"],
        "alibi": ["--arch", "alibi"],
    }, script="generate_gpt.py", timeout=400)


@pytest.fixture(scope="module")
def layouts(root):
    """The two-process runs, in one launch: GPT-2 under each layout (PP2 x VP2 with trainer.predict too) and ALiBi
    under TP2 and CP2."""
    runs = {**LAYOUTS, "pp2_vp2": [*LAYOUTS["pp2_vp2"], "--predict-out", root / "pp2_vp2.jsonl"]}
    runs.update({f"alibi_{layout}": ["--arch", "alibi", *LAYOUTS[layout]] for layout in ALIBI_LAYOUTS})
    return train_together(root, 2, runs, script="generate_gpt.py", timeout=400)


@pytest.fixture(scope="module")
def reference(references, root):
    return references["reference"], root / "model.ckpt", root / "predicted.jsonl"


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
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_generation_matches_one_process(reference, layouts, root, layout):
    ref, _, ref_predicted = reference
    check_internal(ref)
    result = layouts[layout]
    check_internal(result)
    for key in KEYS:
        assert result[key] == ref[key], f"{layout}: {key} differs from one process"
    assert result["beam3_logprob"] == pytest.approx(ref["beam3_logprob"], abs=1e-3)
    for ours, one_process in zip(result["prompt_logprobs"], ref["prompt_logprobs"]):
        assert ours == pytest.approx(one_process, abs=1e-4)
    if layout == "pp2_vp2":  # trainer.predict over a prompts file: one record per prompt, in order, on rank 0
        records, expected = read_jsonl(root / "pp2_vp2.jsonl"), read_jsonl(ref_predicted)
        assert [r["id"] for r in records] == [0, 1, 2] and len(records[0]["tokens"]) == 12
        assert [(r["prompt"], r["tokens"], r["completion"]) for r in records] == [
            (r["prompt"], r["tokens"], r["completion"]) for r in expected]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ALIBI_LAYOUTS)
def test_alibi_trains_and_generates_as_one_process(references, layouts, layout):
    """ALiBi (6 heads, BLOOM-style model): TP ranks add their own heads' slopes, CP ranks use global positions."""
    alibi_reference = references["alibi"]
    check_internal(alibi_reference)
    result = layouts[f"alibi_{layout}"]
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


def test_generate_refuses_a_layout_that_cannot_split_the_devices(capsys):
    with pytest.raises(SystemExit) as done:  # before any process starts: the command runs in this one
        main(["generate", "--config", str(REPO / "recipes" / "gpt-tiny.yaml"), "--prompt", "x", "--devices", "3",
              "--tp", "2"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lightning-megatron generate: error: --devices 3 is not a multiple of --tp x --pp = 2: each replica of the "
        "model takes tp x pp processes")

