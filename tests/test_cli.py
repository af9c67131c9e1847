"""The command line a user types: help, one-line errors, resuming, the recipes' progress bar and sample, and runs
that end promptly on every rank when one fails."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import lightning_megatron  # noqa: F401  (imported before any capsys: Lightning's log handler keeps this stderr)
from launch import REPO, SCRIPTS, child_env
from lightning_megatron_cli import COMMANDS, main

RECIPE = str(REPO / "recipes" / "gpt-tiny.yaml")
FAST = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_checkpointing", "false"]


def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_megatron", *args], capture_output=True, text=True,
                          cwd=REPO, env=env or child_env(), timeout=timeout)


def with_test_callbacks(**extra: str) -> dict:
    """The child environment with tests/scripts importable (for ``--trainer.callbacks+=cli_callbacks....``)."""
    return child_env(PYTHONPATH=os.pathsep.join([str(REPO), str(SCRIPTS)]), **extra)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def warning_lines(text: str) -> list[str]:
    """Python warnings as Lightning and the warnings module print them: ``<file>.py:<line>: <message>``."""
    return [line for line in text.splitlines() if re.search(r"\.py:\d+: ", line)]


def metrics(root: Path, version: int) -> dict[int, float]:
    """step -> train_loss of one run's metrics.csv."""
    with open(root / "lightning_logs" / f"version_{version}" / "metrics.csv") as handle:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(handle) if row["train_loss"]}


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom lightning_megatron_cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit as done:\n    print('exit', done.code, 'torch' in sys.modules)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env())
    elapsed = time.perf_counter() - start
    assert result.stdout.splitlines()[-1] == "exit 0 False"  # nothing heavy imported: seconds faster
    for command in COMMANDS:
        assert f"\n  {command} " in result.stdout, command
    assert elapsed < 5, f"--help took {elapsed:.1f} s"


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fitt"])
    assert done.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: unknown command 'fitt'; choose one of " + ", ".join(COMMANDS) + " (lightning-megatron --help)"]


def test_strategy_by_name_in_yaml_resolves(tmp_path, capsys):
    config = tmp_path / "name.yaml"
    config.write_text("trainer:\n  strategy: megatron\n")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", RECIPE, "--config", str(config), "--print_config"])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err[-3000:]
    assert "strategy: megatron" in printed.out


BAD_INPUT = {
    "layout": (["--trainer.strategy.tensor_model_parallel_size", "3"],
               "tensor_model_parallel_size (3) x pipeline_model_parallel_size (1) x context_parallel_size (1) = 3 "
               "does not divide the 1 processes"),
    "global-batch-0": (["--data.global_batch_size", "0"], "global_batch_size=0 must be at least 1"),
    "micro-batch-0": (["--data.micro_batch_size", "0"], "micro_batch_size=0 must be at least 1"),
    "vocab-below-tokenizer": (["--model.config.vocab_size", "100"],
                              "vocab_size=100 is smaller than the tokenizer's 4096 token ids"),
    "data-longer-than-model": (["--data.seq_length", "256"],
                               "the data's seq_length=256 is longer than the model's seq_length=128"),
    "bad-value": (["--trainer.strategy.tensor_model_parallel_size", "x"],
                  "--trainer.strategy.tensor_model_parallel_size: Expected a <class 'int'>. Got value: x"),
    "unknown-option": (["--trainer.strategy.tensor_model_parallel_sizee", "2"],
                       "Option 'tensor_model_parallel_sizee' is not accepted"),
    "bad-devices": (["--trainer.devices", "abc"], "`devices` selected with `CPUAccelerator` should be an int"),
    "missing-corpus": (["--data.path", "no/such/corpus.jsonl"], "corpus file no/such/corpus.jsonl does not exist"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_user_errors_are_one_line_naming_the_option(name, tmp_path, capsys):
    args, expected = BAD_INPUT[name]
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", RECIPE, "--trainer.default_root_dir", str(tmp_path), *FAST, *args])
    err = capsys.readouterr().err
    assert done.value.code in (1, 2)
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err[-3000:]


@pytest.mark.slow
def test_layout_error_on_two_ranks_prints_once_exits_nonzero_and_leaves_no_process(tmp_path):
    result = cli("fit", "--config", RECIPE, "--trainer.devices", "2", "--trainer.strategy.tensor_model_parallel_size",
                 "3", "--trainer.default_root_dir", str(tmp_path), *FAST, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        "error: tensor_model_parallel_size (3) x pipeline_model_parallel_size (1) x context_parallel_size (1) = 3 "
        "does not divide the 2 processes; set the Trainer's devices x num_nodes to a multiple of 3"]
    assert not _processes_mentioning(str(tmp_path))


def test_debug_shows_the_traceback(tmp_path):
    result = cli("fit", "--config", RECIPE, "--trainer.strategy.tensor_model_parallel_size", "3", "--debug",
                 "--trainer.default_root_dir", str(tmp_path), *FAST, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "LayoutError" in result.stderr
    assert len(error_lines(result.stderr)) == 1


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(text in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.slow
def test_a_bug_on_one_rank_ends_every_rank_within_seconds(tmp_path):
    marker = tmp_path / "failed_at"
    result = cli("fit", "--config", RECIPE, "--trainer.devices", "2", "--trainer.strategy.tensor_model_parallel_size",
                 "2", "--trainer.default_root_dir", str(tmp_path), *FAST, "--trainer.max_steps", "50",
                 "--trainer.callbacks+=cli_callbacks.FailOnRank", "--trainer.callbacks.marker", str(marker),
                 timeout=300, env=with_test_callbacks())
    ended = time.time()
    assert result.returncode != 0
    assert "RuntimeError: a bug on rank 1 at step 2" in result.stderr  # the cause, not only its echo on rank 0
    assert ended - float(marker.read_text()) < 15
    assert not _processes_mentioning(str(tmp_path))


@pytest.mark.slow
def test_resume_last_continues_the_run_with_the_same_losses_and_steps(tmp_path):
    """``--ckpt_path last`` finds the run's checkpoint, says so, and the resumed steps log the uninterrupted run's
    losses under the same step numbers."""
    run = ["--config", RECIPE, "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
           "--trainer.log_every_n_steps", "1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    fresh = cli("fit", *run, "--trainer.default_root_dir", str(whole), "--trainer.max_steps", "6",
                "--ckpt_path", "last")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    output = fresh.stdout + fresh.stderr
    assert f"--ckpt_path last: no checkpoint under {whole} yet; training starts at step 0" in output
    assert "6/6 [" in output  # the bar counts to max_steps
    # Stops between two validations: the end of training is saved too.
    first = cli("fit", *run, "--trainer.default_root_dir", str(split), "--trainer.max_steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli("fit", *run, "--trainer.default_root_dir", str(split), "--trainer.max_steps", "6",
                  "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = split / "checkpoints" / "last.ckpt"
    assert f"Resuming from {last} (step 5), the newest checkpoint under {split}" in resumed.stdout + resumed.stderr
    reference, continued = metrics(whole, 0), metrics(split, 1)
    assert sorted(continued) == [5]  # not one behind: the step the uninterrupted run logged this loss at
    for step, loss in continued.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    assert json.loads((last / "layout.json").read_text())["global_step"] == 6
    assert not warning_lines(resumed.stdout + resumed.stderr), warning_lines(resumed.stdout + resumed.stderr)
    generated = cli("generate", "--ckpt", str(last), "--prompt", "In the beginning", "--max-new-tokens", "4")
    assert generated.returncode == 0 and generated.stdout.startswith("In the beginning"), generated.stderr[-3000:]
    assert not warning_lines(generated.stderr), warning_lines(generated.stderr)

    # A checkpoint cut short (an interrupted copy) names the file instead of failing deep in torch.
    shard = min(last.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    broken = cli("fit", *run, "--trainer.default_root_dir", str(split), "--trainer.max_steps", "8",
                 "--ckpt_path", str(last))
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    lines = error_lines(broken.stderr)
    assert len(lines) == 1 and f"shard {shard.name} holds 100 bytes, the metadata expects" in lines[0], lines


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["bert-tiny", "t5-tiny"])
def test_bert_and_t5_recipes_show_the_bar_with_loss_lr_and_tokens_per_second(recipe, tmp_path):
    result = cli("fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--trainer.default_root_dir",
                 str(tmp_path), *FAST, "--trainer.max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    final = [line for line in result.stdout.replace("\r", "\n").splitlines() if "2/2 [" in line][-1]
    for metric in ("train_loss=", "lr=", "tokens_per_s="):
        assert metric in final, final


@pytest.mark.slow
def test_recipe_trains_with_tensor_parallel_override_and_prints_a_sample(tmp_path):
    report = tmp_path / "threads"
    report.mkdir()
    env = with_test_callbacks()
    env.pop("OMP_NUM_THREADS")  # the default a user gets
    result = cli("fit", "--config", RECIPE, "--trainer.devices", "2",
                 "--trainer.strategy.tensor_model_parallel_size", "2", "--trainer.default_root_dir", str(tmp_path),
                 *FAST, "--trainer.callbacks+=cli_callbacks.ReportThreads", "--trainer.callbacks.directory",
                 str(report), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "Sample: In the beginning" in output
    assert "tokens_per_s=" in output
    assert not warning_lines(output) and "💡" not in output, warning_lines(output)
    # One thread per CPU rank (Lightning's launcher gives its children torch's default, one per core).
    for rank in (0, 1):
        assert json.loads((report / f"rank{rank}.json").read_text()) == {"threads": 1, "omp": "1"}


@pytest.mark.slow
def test_a_failing_sample_warns_in_one_line_and_the_run_succeeds(tmp_path):
    override = tmp_path / "sample.yaml"
    long_prompt = "And God said, Let there be light: and there was light. " * 40  # longer than the model's context
    override.write_text(json.dumps({"trainer": {"callbacks": [{
        "class_path": "lightning_megatron.callbacks.SampleText", "init_args": {"prompt": long_prompt}}]}}))
    result = cli("fit", "--config", RECIPE, "--config", str(override), "--trainer.default_root_dir", str(tmp_path),
                 *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("SampleText: no sample (")]
    assert len(warnings) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
