"""LoRA and init_from: what a fine-tuning user sees (losses, weights, logits, files), in one process and under
TP/PP/SP/DP with real processes."""

import dataclasses
import subprocess
import sys

import lightning as L
import pytest
import torch
import transformers
from megatron.core import dist_checkpointing
from peft import PeftModel
from safetensors.torch import load_file

from launch import REPO, child_env, train_together
from lightning_megatron import GPT, GPTConfig, MegatronStrategy, OptimConfig, ParallelConfig, parallel
from lightning_megatron.checkpoint import CheckpointError
from lightning_megatron.convert.core import build_module
from lightning_megatron.convert.consolidated import export_consolidated
from lightning_megatron.convert.hf import export_hf, hf_to_checkpoint
from lightning_megatron.convert.peft import export_peft
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.data import TextDataModule
from lightning_megatron.errors import UserError
from lightning_megatron.models.lora import LoRAConfig, is_adapter, merge_adapters
from lightning_megatron.parallel import unwrap
from test_layouts import STEPS, assert_same_run

VOCAB = 4096
SEQ = 32
CONFIGS = {
    "gpt2": lambda: GPTConfig.tiny(VOCAB, num_layers=2, hidden_size=64, seq_length=SEQ),
    "llama": lambda: GPTConfig.llama_tiny(VOCAB, num_layers=2, hidden_size=64, ffn_hidden_size=160, seq_length=SEQ),
}


class WeightsAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in unwrap(pl_module.chunks[0]).state_dict().items()
                        if isinstance(v, torch.Tensor)}


def fit_lora(kind: str, steps: int = 3, **options) -> tuple[GPT, L.Trainer, dict[str, torch.Tensor]]:
    data = TextDataModule(seq_length=SEQ, global_batch_size=4, micro_batch_size=2)
    model = GPT(CONFIGS[kind](), OptimConfig(lr=1e-2, warmup_steps=0), **options)
    start = WeightsAtStart()
    trainer = L.Trainer(strategy=MegatronStrategy(), accelerator="cpu", devices=1, max_steps=steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[start])
    trainer.fit(model, datamodule=data)
    return model, trainer, start.weights


def logits(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad(), CPUEmulation():
        return unwrap(model.chunks[0])(tokens, positions, None)[..., :VOCAB].clone()


def test_only_adapters_train_and_merging_keeps_the_logits():
    model, trainer, start = fit_lora("gpt2", lora=LoRAConfig(rank=4, alpha=8))
    after = unwrap(model.chunks[0]).state_dict()
    adapters = [name for name in start if is_adapter(name)]
    assert len(adapters) == 2 * 4 * 2  # A and B of qkv, proj, fc1, fc2 in each of the 2 layers
    for name, tensor in start.items():
        if is_adapter(name):
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"the frozen {name} changed"
    trained = {id(p) for name, p in unwrap(model.chunks[0]).named_parameters() if is_adapter(name)}
    optimized = {id(p) for group in trainer.strategy.optimizers[0].param_groups for p in group["params"]}
    assert optimized == trained

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    unmerged = logits(model, tokens)
    assert merge_adapters(model.chunks) == 4 * 2
    assert not any(is_adapter(name) for name in unwrap(model.chunks[0]).state_dict())
    torch.testing.assert_close(logits(model, tokens), unmerged, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_adapters_on_the_base_export_equal_the_merged_export(kind, tmp_path):
    model, _, _ = fit_lora(kind, lora=LoRAConfig(rank=4, alpha=8))
    with CPUEmulation():
        export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
        export_hf(model, tmp_path / "merged")
        # The base weights are frozen: a fresh model of the same seed is the fine-tuned model's base.
        parallel.initialize(ParallelConfig(), seed=1)
        export_hf(build_module(GPT(CONFIGS[kind]()), ParallelConfig()), tmp_path / "base")
    architecture = getattr(transformers, {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[kind])
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = architecture.from_pretrained(tmp_path / "merged").eval()(tokens).logits
        base = architecture.from_pretrained(tmp_path / "base").eval()
        base_logits = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(tokens).logits
    assert (adapted - base_logits).abs().max() > 1e-2, "the adapters changed nothing"
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-4)


def test_fine_tuning_options_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="lora.targets=.*qkv, proj, fc1, fc2"):
        LoRAConfig(targets=["q_proj"])
    with pytest.raises(CheckpointError, match="init_from .*missing.ckpt does not exist; set model.init_args.init_from"):
        fit_lora("gpt2", init_from=str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize("kind", ["consolidated", "converted"])
def test_init_from_consolidated_and_converted_weights(kind, gloo_world, tmp_path):
    config = CONFIGS["gpt2"]()
    with CPUEmulation():
        parallel.initialize(ParallelConfig(), seed=1)
        source = build_module(GPT(dataclasses.replace(config, seed=7)), ParallelConfig())
        export_consolidated(source, tmp_path / "base.safetensors")
        export_hf(source, tmp_path / "hf")
        export_consolidated(build_module(GPT(dataclasses.replace(config, hidden_size=32)), ParallelConfig()),
                            tmp_path / "narrow.safetensors")
    path = tmp_path / "base.safetensors"
    if kind == "converted":
        path = hf_to_checkpoint(tmp_path / "hf", tmp_path / "converted")
    _, _, start = fit_lora("gpt2", steps=1, lora=LoRAConfig(rank=4, alpha=8), init_from=str(path))
    expected = load_file(tmp_path / "base.safetensors")
    for name, tensor in start.items():
        if not is_adapter(name) and name != "output_layer.weight":  # tied to the embeddings
            torch.testing.assert_close(tensor, expected[name][: tensor.shape[0]], rtol=0, atol=0, msg=name)
    with pytest.raises(CheckpointError, match="the model config does not match the checkpoint's"):
        fit_lora("gpt2", steps=1, init_from=str(tmp_path / "narrow.safetensors"))


# ---------------------------------------------------------------------------------------------------- layouts
LORA = ["--lora", "--steps", STEPS]
LAYOUTS = {
    "tp2": ["--tp", 2],
    "pp2": ["--pp", 2],
    "dp2": [],
    "tp2-sp": ["--tp", 2, "--sp"],
    "dp2-distributed-optimizer": ["--dist-opt"],
    "pp2-vp2": ["--pp", 2, "--vp", 2],
    "cp2": ["--cp", 2],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def runs(root) -> dict[str, dict]:
    """Every run of this file's layout and checkpoint tests by name: the two-process ones in one launch, then the
    single-process ones (which load what those saved) in another. Files are named after their run."""
    adapters_only = ["--lora", "--adapters-only", "--init-from", root / "base_tp2.ckpt"]
    two = {name: [*LORA, "--export", root / f"{name}.safetensors", *args] for name, args in LAYOUTS.items()}
    two.update({
        "tp2_saved": ["--tp", 2, *LORA, "--save-end", root / "tp2_saved.ckpt"],
        "base_tp2": ["--tp", 2, "--steps", STEPS, "--save-end", root / "base_tp2.ckpt"],  # a base model
        "init_from_base_pp2": ["--pp", 2, "--steps", STEPS, "--init-from", root / "base_tp2.ckpt", "--validate-only"],
        "adapters_only_pp2": ["--pp", 2, "--steps", 3, *adapters_only, "--save-end", root / "adapters_only_pp2.ckpt"],
    })
    one = {
        "reference": [*LORA, "--export", root / "reference.safetensors"],
        "tp2_saved_in_one": [*LORA, "--validate-only", "--resume", root / "tp2_saved.ckpt"],
        "adapters_only_in_one": ["--steps", 3, *adapters_only, "--validate-only", "--resume",
                                 root / "adapters_only_pp2.ckpt"],
    }
    return {**train_together(root, 2, two), **train_together(root, 1, one)}


@pytest.fixture(scope="module")
def lora_reference(runs, root):
    return {**runs["reference"], "weights": load_file(root / "reference.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_matches_single_process(name, runs, lora_reference, root):
    assert_same_run(runs[name], root / f"{name}.safetensors", lora_reference)


@pytest.mark.slow
def test_adapters_survive_a_tp2_save_and_load_into_one_process(runs):
    saved = runs["tp2_saved"]
    # Every adapter shard was written: the single process evaluates the TP=2 model exactly.
    assert abs(runs["tp2_saved_in_one"]["val_loss"] - saved["val_loss"]) <= 1e-4 * saved["val_loss"]


@pytest.mark.slow
def test_init_from_a_tp2_checkpoint_into_pp2(runs):
    base = runs["base_tp2"]
    assert abs(runs["init_from_base_pp2"]["val_loss"] - base["val_loss"]) <= 1e-4 * base["val_loss"]


@pytest.mark.slow
def test_adapters_only_checkpoint_restores_the_model_with_init_from(runs, root):
    base, tuned = runs["base_tp2"], runs["adapters_only_pp2"]
    assert tuned["steps"] == [1, 2, 3], "init_from starts at step 0"
    assert tuned["losses"][0] < base["losses"][0] - 0.05, "the run did not start from the trained base"
    saved = dist_checkpointing.load_tensors_metadata(str(root / "adapters_only_pp2.ckpt"))
    assert all(is_adapter(key) for key in saved if not key.startswith("optimizer."))
    assert abs(runs["adapters_only_in_one"]["val_loss"] - tuned["val_loss"]) <= 1e-4 * tuned["val_loss"]


# ---------------------------------------------------------------------------------------------------- recipes
def cli(*args, status=0, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "lightning_megatron" / "cli.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=REPO)
    assert result.returncode == status, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_lora_recipes_fine_tune_export_and_generate(gpt_tiny_run, tmp_path):
    short = ["--trainer.max_steps", 3, "--trainer.val_check_interval", 3, "--trainer.limit_val_batches", 1]
    base = gpt_tiny_run / "checkpoints" / "last.ckpt"
    for recipe in ("gpt-tiny-lora", "gpt-tiny-lora-sft"):
        cli("fit", "--config", f"recipes/{recipe}.yaml", "--model.init_args.init_from", base, *short,
            "--trainer.default_root_dir", tmp_path / recipe)
    tuned = tmp_path / "gpt-tiny-lora" / "checkpoints" / "last.ckpt"
    cli("convert", "megatron-to-hf", "--ckpt", tuned, "--config", "recipes/gpt-tiny-lora.yaml", "--out",
        tmp_path / "adapter", "--adapter-only")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    # The merged export needs no recipe (the checkpoint saved its LoRA options) and equals base + PEFT adapters.
    cli("convert", "megatron-to-hf", "--ckpt", base, "--out", tmp_path / "hf-base")
    cli("convert", "megatron-to-hf", "--ckpt", tuned, "--out", tmp_path / "hf-merged")
    tokens = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged").eval()(tokens).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base")
        adapted = PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()(tokens).logits
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=0)
    generated = cli("generate", "--ckpt", tuned, "--config", "recipes/gpt-tiny-lora.yaml", "--prompt",
                    "In the beginning", "--max-new-tokens", 4)
    assert generated.stdout.startswith("In the beginning")
    # The base model's recipe has no adapters: loading would drop what fine-tuning learned.
    wrong = cli("generate", "--ckpt", tuned, "--config", "recipes/gpt-tiny.yaml", "--prompt", "In", status=1)
    assert "holds the LoRA adapter" in wrong.stderr and "model.init_args.lora" in wrong.stderr
