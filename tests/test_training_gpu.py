"""Training on a GPU: megatron's fused kernels and CUDA graphs train to the losses of the plain path, and a training
step makes no synchronising CUDA call of ours (runs only where a GPU is present)."""

import sys
from dataclasses import replace

import lightning as L
import pytest
import torch

import lightning_megatron as lm
from launch import REPO
from lightning_megatron.models.config import FUSIONS

sys.path.insert(0, str(REPO / "benchmarks"))
from train_throughput import RandomData, SyncCensus, all_fusions  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

STEPS = 20
GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 4, 256


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def config(arch: str, **overrides) -> lm.GPTConfig:
    shape = dict(vocab_size=1024, num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=SEQ)
    preset = {"llama": lm.GPTConfig.llama, "gpt2": lm.GPTConfig.gpt2_124m}.get(arch, lm.GPTConfig)
    return replace(preset(**shape), **overrides)


def train(model_config: lm.GPTConfig, steps: int = STEPS, callback: L.Callback | None = None, **strategy) -> list[float]:
    losses = Losses()
    trainer = L.Trainer(strategy=lm.MegatronStrategy(**strategy), accelerator="gpu", devices=1, precision="bf16-mixed",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[losses, *([callback] if callback else [])])
    # Each sample counts up from a random token, so the next token is learnable and the losses fall quickly.
    data = RandomData(model_config.vocab_size, SEQ, GLOBAL_BATCH, MICRO_BATCH, steps)
    starts = data.train_dataset.tokens[:, :1]
    data.train_dataset.tokens = (starts + torch.arange(SEQ + 1)) % model_config.vocab_size
    trainer.fit(lm.GPT(model_config, lm.OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=steps)), datamodule=data)
    return losses.losses


def assert_bf16_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == STEPS
    assert want[-1] < want[0] - 0.3, f"the model did not learn: {want}"
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 0.02 * abs(b), f"step {step}: {a} != {b}\n{got}\n{want}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_kernels_train_to_the_unfused_losses(arch):
    # Every fusion megatron has without TE runs here: Llama's SwiGLU and GPT-2's tanh GeLU take the bias-activation
    # fusion, both the bias-dropout-add and cross-entropy ones; GPT-2's LayerNorms run our Triton kernels.
    fused = train(all_fusions(config(arch)))
    unfused = train(config(arch, **dict.fromkeys(FUSIONS, False)))
    assert_bf16_close(fused, unfused)


class FirstGradients(L.Callback):
    """Every parameter's fp32 main gradient after the first step (before the next one zeroes the buffers)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.grads = {name: param.main_grad.detach().clone() for name, param in pl_module.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied embeddings (megatron's zero_out_wgrad path) and untied
def test_fused_wgrad_accumulation_gives_the_unfused_gradients_and_losses(arch):
    # Two microbatches per step, so the second GEMM accumulates onto the first one's gradient.
    fused, unfused = FirstGradients(), FirstGradients()
    fused_losses = train(config(arch), callback=fused)
    unfused_losses = train(config(arch), callback=unfused, fuse_wgrad_accumulation=False)
    assert fused.grads.keys() == unfused.grads.keys() and any("embedding" in name for name in fused.grads)
    for name, want in unfused.grads.items():
        error = (fused.grads[name] - want).norm() / want.norm()
        assert error < 1e-2, f"{name}: relative error {error:.2e}"
    assert_bf16_close(fused_losses, unfused_losses)


def test_training_steps_make_no_synchronising_call_of_ours():
    census = SyncCensus(warmup=3)
    train(config("gpt2"), steps=10, callback=census)
    assert census.steps == 6
    ours = {site: count for site, count in census.sites.items() if "megatron/" in site}  # also lightning_megatron/
    assert not ours, f"synchronising CUDA calls in 6 steps: {census.sites.most_common()}"


def test_cuda_graphs_train_to_the_eager_losses():
    eager = train(config("gpt2"))
    graphed = train(config("gpt2", layer_norm_fusion=True), cuda_graphs=True)  # the Triton LayerNorm captured too
    assert_bf16_close(graphed, eager)
