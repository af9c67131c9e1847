"""``convert megatron-to-hf`` from checkpoints written by ``fit``: a GPT trained under TP=2, PP=2 x VP=2 and DP=2
(distributed optimizer), exported in one process, gives in ``transformers`` (``AutoModelForCausalLM`` +
``AutoTokenizer``) the logits and the greedy text the trained model gave in its own layout; BERT and T5 runs export
to their Auto classes; bad input fails in one line naming the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from launch import REPO, SCRIPTS, child_env
from lightning_megatron.checkpoint import read_saved_module
from lightning_megatron.convert import build_module, load_any_checkpoint
from lightning_megatron.models.saved import module_from_saved
from lightning_megatron_cli import main
from test_convert_hf import logits_of

RECIPES = REPO / "recipes"
FAST = ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]"]
LAYOUTS = {
    "tp2": ["--trainer.strategy.tensor_model_parallel_size", "2"],
    "pp2vp2": ["--trainer.strategy.pipeline_model_parallel_size", "2",
               "--trainer.strategy.virtual_pipeline_model_parallel_size", "2"],
    "dp2": ["--trainer.strategy.use_distributed_optimizer", "true"],
}


def lm(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_megatron", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env or child_env(), timeout=timeout)


def fit(recipe: str | Path, root: Path, *args: str, env: dict | None = None) -> Path:
    """Train ``recipe`` (a path, or a name under recipes/) for a few steps into ``root``; its last checkpoint."""
    result = lm("fit", "--config", RECIPES / recipe, "--trainer.default_root_dir", root, "--trainer.max_steps", "4",
                *FAST, *args, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "checkpoints" / "last.ckpt"


def export(ckpt: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return lm("convert", "megatron-to-hf", "--ckpt", ckpt, "--out", out, *args)


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory) -> dict[str, Path]:
    """gpt-tiny trained 4 steps under each layout from a recipe of its own (``<root>/recipe.yaml``), each run's record
    of its logits and greedy text beside it."""
    runs = {}
    for name, layout in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        # A vocabulary that megatron pads to 4224 rows in one process but 4352 under TP=2; wider initial weights
        # than the recipe's, so that a few steps give a greedy text of distinct tokens.
        recipe = (RECIPES / "gpt-tiny.yaml").read_text().replace("vocab_size: 4096", "vocab_size: 4100\n"
                                                                 "      init_method_std: 0.3")
        (root / "recipe.yaml").write_text(recipe)
        env = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}")
        fit(root / "recipe.yaml", root, "--trainer.devices", "2", *layout,
            "--trainer.callbacks+=cli_callbacks.RecordOutputs", "--trainer.callbacks.directory", str(root), env=env)
        runs[name] = root
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("recipe", [True, False], ids=["recipe", "saved-config"])
def test_fit_checkpoint_exports_what_transformers_runs_alike(gpt_runs, tmp_path, layout, recipe):
    root = gpt_runs[layout]
    out = tmp_path / "hf"
    result = export(root / "checkpoints" / "last.ckpt", out, *(["--config", root / "recipe.yaml"] * recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote {out}" in result.stdout and "to HF: 100%" in result.stderr  # the progress bar
    assert ("tokenizer: the bundled corpus's" in result.stderr) != recipe  # the recipe names its tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = torch.load(root / "logits.pt")
    with torch.no_grad():
        theirs = model(ours["tokens"]).logits
    assert theirs.shape[-1] == 4100 and (theirs - ours["logits"]).abs().max() <= 1e-4
    greedy = json.loads((root / "greedy.json").read_text())
    prompt = tokenizer("In the beginning", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=len(greedy["tokens"]), do_sample=False)[0, prompt.shape[1]:]
    assert generated.tolist() == greedy["tokens"] and len(set(greedy["tokens"])) > 3
    assert tokenizer.decode(generated, skip_special_tokens=True) == greedy["text"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, gpt_tiny_run) -> dict[str, Path]:
    """gpt-tiny (the suite's shared run), bert-tiny and t5-tiny trained 4 steps in one process."""
    runs = {recipe: fit(f"{recipe}.yaml", tmp_path_factory.mktemp(recipe)) for recipe in ("bert-tiny", "t5-tiny")}
    return {"gpt-tiny": gpt_tiny_run / "checkpoints" / "last.ckpt", **runs}


def _our_logits(ckpt: Path, inputs: dict, layout) -> torch.Tensor:
    """Logits of the trained module, loaded from its fit checkpoint into one process."""
    module = build_module(module_from_saved(read_saved_module(ckpt)), layout)
    module.chunks.eval()
    load_any_checkpoint(module, ckpt)
    return logits_of(module, inputs)


@pytest.mark.slow
def test_bert_and_t5_fit_checkpoints_export_to_their_auto_classes(one_process_runs, one_rank, tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 4096, (2, 16))
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 12:] = 0
    types = (torch.arange(16) >= 8).long().expand(2, 16)
    bert_inputs = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 16), "padding_mask": padding,
                   "tokentype_ids": types, "sentence_order": torch.tensor([0, 1])}
    decoder = torch.randint(0, 4096, (2, 8))
    t5_inputs = {"enc_tokens": tokens, "enc_mask": padding, "dec_tokens": decoder, "labels": decoder,
                 "loss_mask": torch.ones(2, 8)}
    for recipe, auto, inputs in (("bert-tiny", transformers.AutoModelForPreTraining, bert_inputs),
                                 ("t5-tiny", transformers.AutoModelForSeq2SeqLM, t5_inputs)):
        ckpt, out = one_process_runs[recipe], tmp_path / recipe
        result = export(ckpt, out)
        assert result.returncode == 0, result.stderr[-4000:]
        model = auto.from_pretrained(out).eval()
        transformers.AutoTokenizer.from_pretrained(out)
        with torch.no_grad():
            if recipe == "bert-tiny":
                theirs = model(tokens, attention_mask=padding, token_type_ids=types).prediction_logits
            else:
                theirs = model(tokens, attention_mask=padding, decoder_input_ids=decoder).logits
        ours = _our_logits(ckpt, inputs, one_rank)
        valid = padding.bool() if recipe == "bert-tiny" else torch.ones(2, 8, dtype=torch.bool)
        assert (theirs - ours)[valid].abs().max() <= 1e-4, recipe
    # The encoder alone, as the BertModel that downstream fine-tuning code loads.
    encoder = tmp_path / "encoder"
    assert export(one_process_runs["bert-tiny"], encoder, "--architecture", "BertModel").returncode == 0
    assert type(transformers.AutoModel.from_pretrained(encoder)).__name__ == "BertModel"
    whole, alone = load_file(tmp_path / "bert-tiny" / "model.safetensors"), load_file(encoder / "model.safetensors")
    assert sorted(alone) == sorted(name.removeprefix("bert.") for name in whole if name.startswith("bert."))
    assert all(torch.equal(alone[name], whole[f"bert.{name}"]) for name in alone)


@pytest.mark.slow
def test_bad_checkpoints_and_recipes_fail_in_one_line(one_process_runs, tmp_path, capsys):
    gpt, bert = one_process_runs["gpt-tiny"], one_process_runs["bert-tiny"]

    def error_of(ckpt, out, *args) -> str:
        """The error line of the command, run in this process (as ``lightning-megatron convert ...`` runs it)."""
        with pytest.raises(SystemExit) as done:
            main(["convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(out), *map(str, args)])
        stderr = capsys.readouterr().err
        assert done.value.code == 2, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, stderr[-3000:]
        return lines[0]

    assert "does not exist; pass --ckpt" in error_of(tmp_path / "nowhere", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    assert "is not a checkpoint" in error_of(tmp_path / "empty", tmp_path / "o2")
    truncated = tmp_path / "truncated.ckpt"
    shutil.copytree(gpt, truncated)
    shard = sorted(truncated.glob("*.distcp"), key=lambda f: f.stat().st_size)[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert f"shard {shard.name} holds" in error_of(truncated, tmp_path / "o3")
    assert "holds a Bert, the recipe's model is a GPT" in error_of(bert, tmp_path / "o4", "--config",
                                                                   RECIPES / "gpt-tiny.yaml")
    wider = tmp_path / "wider.yaml"
    wider.write_text((RECIPES / "gpt-tiny.yaml").read_text().replace("hidden_size: 128", "hidden_size: 64"))
    assert "'hidden_size': (128, 64)" in error_of(gpt, tmp_path / "o5", "--config", wider)
    assert "tokenizer nowhere.json does not exist" in error_of(gpt, tmp_path / "o7", "--tokenizer", "nowhere.json")
    assert "cannot be written as T5ForConditionalGeneration; pass --architecture GPT2LMHeadModel" in error_of(
        gpt, tmp_path / "o6", "--architecture", "T5ForConditionalGeneration")
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no partial output left behind
