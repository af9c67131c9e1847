"""lm-evaluation-harness itself on a small local task (YAML + jsonl written here, nothing downloaded), both ways:
``local-completions`` against ``lightning-megatron serve`` on loopback, and the ``lightning-megatron`` model under
TP=2. Both report the accuracy, log-likelihoods and generations that ``evaluate`` and ``generate`` give in one
process for the same texts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import launch
import lightning_megatron as lm
from generation_helpers import cpu_process
from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import SamplingParams, build_engine, generate
from lightning_megatron.generation.evaluate import encode_pair, last_word_accuracy, perplexity, split_last_word
from lightning_megatron.generation.scoring import continuation_loglikelihoods, prefix_token, rolling_loglikelihoods

RECIPE = launch.REPO / "recipes" / "gpt-tiny.yaml"
CLI = launch.REPO / "lightning_megatron" / "cli.py"
CONTEXTS = ["In the beginning God created the heaven and", "And God said, Let there be", "Blessed are the meek: for",
            "And the LORD said unto Moses,"]
DOCUMENTS = ["In the beginning God created the heaven and the earth.",
             "And the earth was without form, and void; and darkness was upon the face of the deep.",
             "Blessed are the meek: for they shall inherit the earth.", "Jesus wept."]
TASKS = {
    "local_lambada": """
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "local_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
""",
    "local_generate": """
output_type: generate_until
doc_to_text: "{{text}}"
doc_to_target: "{{text}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 6}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


def write_tasks(root: Path, data: dict) -> None:
    for task, body in TASKS.items():
        (root / f"{task}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in data[task]))
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / f'{task}.jsonl'}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The task files, and what one process computes for them with the recipe's model (its initial weights, which
    every layout and tool builds alike)."""
    root = tmp_path_factory.mktemp("harness")
    config = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["config"]
    tokenizer = load_tokenizer(None)
    with cpu_process():
        model = lm.GPT(lm.GPTConfig(**config))
        model.configure_model()
        free = generate(model, CONTEXTS, SamplingParams(max_new_tokens=6, ignore_eos=True), tokenizer=tokenizer)
        # The model's own next word makes a correct example, a made-up word a wrong one.
        lambada = [f"{c} {o.text.split()[0]}" for c, o in zip(CONTEXTS, free) if o.text.startswith(" ")]
        lambada += [f"{c} zzqx" for c in CONTEXTS[:2]]
        data = {"local_lambada": lambada, "local_rolling": DOCUMENTS, "local_generate": CONTEXTS}
        engine = build_engine(model, tokenizer, max_batch_size=4)
        expected = {
            "lambada": last_word_accuracy(model, tokenizer, lambada),
            "text": perplexity(model, tokenizer, DOCUMENTS),
            "local_lambada": continuation_loglikelihoods(
                engine, [encode_pair(tokenizer, *split_last_word(t)) for t in lambada]),
            "local_rolling": rolling_loglikelihoods(engine, tokenizer.encode_batch(DOCUMENTS), prefix_token(tokenizer)),
            "local_generate": [o.text for o in generate(model, CONTEXTS, SamplingParams(max_new_tokens=6, stop=["\n"]),
                                                        tokenizer=tokenizer)],
        }
    assert 0 < expected["lambada"]["accuracy"] < 1, expected["lambada"]
    write_tasks(root, data)
    env = launch.child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"),
                           NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return root, expected, env


def lm_eval_args(root: Path, out: Path) -> list[str]:
    return ["--tasks", ",".join(TASKS), "--include_path", str(root), "--batch_size", "4", "--output_path", str(out),
            "--log_samples"]


def run(command: list, env: dict, timeout: float = 500) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=launch.REPO,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def read_results(out: Path) -> tuple[dict, dict]:
    """lm-eval's metrics per task, and each task's responses in document order."""
    metrics = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    responses = {}
    for task in TASKS:
        samples = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        responses[task] = [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return metrics, responses


def check(metrics: dict, responses: dict, expected: dict) -> None:
    assert metrics["local_lambada"]["acc,none"] == expected["lambada"]["accuracy"]
    assert metrics["local_lambada"]["perplexity,none"] == pytest.approx(expected["lambada"]["perplexity"], rel=1e-4)
    scored = [(float(ll), greedy == "True") for ll, greedy in responses["local_lambada"]]
    assert [g for _, g in scored] == [g for _, g in expected["local_lambada"]]
    assert [ll for ll, _ in scored] == pytest.approx([ll for ll, _ in expected["local_lambada"]], abs=1e-4)
    rolling = [float(r) for r in responses["local_rolling"]]
    assert rolling == pytest.approx(expected["local_rolling"], abs=1e-4)
    assert sum(rolling) == pytest.approx(expected["text"]["loglikelihood"], abs=1e-3)
    assert responses["local_generate"] == expected["local_generate"]


@pytest.mark.slow
def test_lm_eval_with_the_lightning_megatron_model_under_tp2(reference):
    root, expected, env = reference
    out = root / "adapter"
    run([sys.executable, CLI, "lm-eval", "--model", "lightning-megatron", "--model_args",
         f"config={RECIPE},tp=2,accelerator=cpu", *lm_eval_args(root, out)], env)
    check(*read_results(out), expected)


@pytest.mark.slow
def test_lm_eval_local_completions_against_serve(reference):
    root, expected, env = reference
    out = root / "served"
    with launch.serving(["--config", RECIPE, "--accelerator", "cpu"], open(root / "serve.log", "w+"), env) as (_, port):
        run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
             f"base_url=http://127.0.0.1:{port}/v1/completions,model=lightning-megatron,max_length=128",
             *lm_eval_args(root, out)], env)
    check(*read_results(out), expected)
