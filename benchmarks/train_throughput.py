"""Training throughput of Trainer(strategy="megatron") against baselines run in the same process.

Cases (each prints a table row and appends a JSON line to --out):
  overhead  our strategy vs a bare megatron-core loop on the same model (schedule + DDP + optimizer, no Lightning)
  hf        our strategy vs Hugging Face transformers GPT-2 (same shape, bf16 autocast, SDPA, fused AdamW)
  mfu       our strategy on GPT presets (124M, 350M, 1.3B)
  memory    peak memory with no / selective / full recompute and with the distributed optimizer
  compile   compile_layers=True (torch.compile of each transformer layer) vs eager, on the --presets

GPU:  python benchmarks/train_throughput.py --cases overhead hf mfu memory
CPU smoke (tiny model, overhead ratio only): python benchmarks/train_throughput.py --device cpu --cases overhead
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from dataclasses import asdict, replace

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import lightning_megatron as lm
from lightning_megatron.callbacks.throughput import gpt_flops_per_token, peak_tflops
from lightning_megatron.data.datamodule import MegatronDataModule


class RandomTokens(Dataset):
    """Fixed random token windows (the data pipeline is not what is measured)."""

    def __init__(self, vocab_size: int, seq_length: int, samples: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab_size, (samples, seq_length + 1), generator=generator)
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[index]
        return {"tokens": window[:-1], "labels": window[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


class RandomData(MegatronDataModule):
    def __init__(self, vocab_size: int, seq_length: int, global_batch_size: int, micro_batch_size: int,
                 steps: int) -> None:
        super().__init__(global_batch_size, micro_batch_size)
        self.train_dataset = RandomTokens(vocab_size, seq_length, global_batch_size * steps)

    def val_dataloader(self) -> list:
        return []


class StepTimer(L.Callback):
    """Wall time of each optimizer step, synchronised with the device."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(self._now(trainer) - self._start)


def median_step(times: list[float], warmup: int) -> float:
    steady = sorted(times[warmup:])
    return steady[len(steady) // 2]


def run_ours(config: lm.GPTConfig, args: argparse.Namespace, **strategy_kwargs) -> dict:
    baseline = 0
    if args.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    data = RandomData(config.vocab_size, config.seq_length, args.global_batch, args.micro_batch, args.steps)
    timer = StepTimer()
    trainer = L.Trainer(
        strategy=lm.MegatronStrategy(**strategy_kwargs), accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1, precision=args.precision, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model = lm.GPT(config, lm.OptimConfig(lr=1e-4, warmup_steps=0, decay_steps=args.steps))
    trainer.fit(model, datamodule=data)
    step = median_step(timer.times, args.warmup)
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if args.device == "cuda" else None
    del trainer, model
    return {"step_s": step, "peak_mem_gb": peak}


def run_bare_megatron(config: lm.GPTConfig, args: argparse.Namespace) -> dict:
    """The same model trained by megatron-core's own pieces in a hand-written loop (what Megatron-LM does)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from lightning_megatron import parallel
    from lightning_megatron.backends import use_foreach_multi_tensor_kernels
    from lightning_megatron.cpu import CPUEmulation

    emulation = CPUEmulation() if args.device == "cpu" else None
    if emulation:
        emulation.__enter__()
    parallel.initialize(lm.ParallelConfig(), seed=1234)
    use_foreach_multi_tensor_kernels()
    module = lm.GPT(config)
    bf16 = args.precision.startswith("bf16")
    fused = args.device == "cuda"
    tconfig = module.transformer_config(
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, calculate_per_token_loss=True,
        bias_activation_fusion=fused, bias_dropout_fusion=fused, cross_entropy_loss_fusion=fused,
    )
    model = module.build_stage(tconfig, True, True, None).to(args.device)
    if bf16:
        model = Float16Module(tconfig, model)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=1e-4, bf16=bf16, params_dtype=tconfig.params_dtype, clip_grad=1.0), [model]
    )
    dataset = RandomTokens(config.vocab_size, config.seq_length, args.global_batch * args.steps)
    loader = DataLoader(dataset, batch_size=args.micro_batch)
    schedule = get_forward_backward_func()
    microbatches = args.global_batch // args.micro_batch
    batches = iter(loader)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        chunk = [{k: v.to(args.device, non_blocking=True) for k, v in next(batches).items()} for _ in range(microbatches)]
        schedule(forward_step_func=_bare_forward_step(module), data_iterator=iter(chunk), model=[model],
                 num_microbatches=microbatches, seq_length=config.seq_length, micro_batch_size=args.micro_batch)
        optimizer.step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    parallel.destroy()
    if emulation:
        emulation.__exit__(None, None, None)
    del model, optimizer
    return {"step_s": median_step(times, args.warmup)}


def _bare_forward_step(module: lm.GPT):
    def step(data_iterator, model):
        output, loss_fn = module.forward_step(model, next(data_iterator))

        def megatron_loss(output_tensor):
            loss, tokens = loss_fn(output_tensor)
            return loss, tokens.int(), {"loss": torch.stack([loss.detach(), tokens.float()])}

        return output, megatron_loss

    return step


def run_hf(config: lm.GPTConfig, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, GPT2Config

    hf_config = GPT2Config(vocab_size=config.padded_vocab_size(), n_positions=config.seq_length, n_embd=config.hidden_size,
                           n_layer=config.num_layers, n_head=config.num_attention_heads, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    dataset = RandomTokens(config.vocab_size, config.seq_length, args.global_batch * args.steps)
    loader = iter(DataLoader(dataset, batch_size=args.micro_batch))
    microbatches = args.global_batch // args.micro_batch
    times = []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(microbatches):
            batch = next(loader)
            with torch.autocast(args.device, dtype=torch.bfloat16):
                loss = model(input_ids=batch["tokens"].to(args.device), labels=batch["tokens"].to(args.device)).loss
            (loss / microbatches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    del model, optimizer
    return {"step_s": median_step(times, args.warmup)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU (torch {torch.__version__})"


def report(case: str, name: str, config: lm.GPTConfig, args: argparse.Namespace, result: dict, out: str,
           **extra) -> dict:
    tokens = args.global_batch * config.seq_length
    flops = gpt_flops_per_token(config.num_layers, config.hidden_size, config.seq_length, config.padded_vocab_size(),
                                config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size,
                                config.activation == "swiglu", extra.pop("recompute_layers", 0))
    row = {"case": case, "name": name, "tokens_per_s": tokens / result["step_s"], **result,
           "tflops": tokens * flops / result["step_s"] / 1e12, "hardware": hardware(args.device),
           "precision": args.precision, "shape": {k: v for k, v in asdict(config).items()
                                                   if k in ("num_layers", "hidden_size", "num_attention_heads",
                                                            "seq_length", "vocab_size")},
           "global_batch": args.global_batch, "micro_batch": args.micro_batch, **extra}
    peak = peak_tflops(torch.device(args.device))
    if peak:
        row["mfu"] = row["tflops"] / peak
    print(json.dumps(row), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--cases", nargs="+", default=["overhead", "hf", "mfu", "memory"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--presets", nargs="+", default=["gpt2_124m", "gpt2_350m", "gpt2_1_3b"])
    parser.add_argument("--out", default="benchmarks/results/train_throughput.jsonl")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.precision = "bf16-mixed" if cuda else "32-true"
    args.steps = args.steps or (20 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.global_batch = args.global_batch or (16 if cuda else 8)
    args.micro_batch = args.micro_batch or (8 if cuda else 2)
    seq = args.seq or (1024 if cuda else 64)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)

    base = lm.GPTConfig.gpt2_124m(seq_length=seq) if cuda else lm.GPTConfig.tiny(vocab_size=4096, seq_length=seq,
                                                                                   hidden_size=64)
    print(f"# hardware: {hardware(args.device)}; precision {args.precision}; global batch {args.global_batch}, "
          f"micro batch {args.micro_batch}, seq {seq}", flush=True)
    if "overhead" in args.cases:
        bare = report("overhead", "bare megatron-core loop", base, args, run_bare_megatron(base, args), args.out)
        ours = report("overhead", "Trainer(strategy='megatron')", base, args, run_ours(base, args), args.out)
        print(f"strategy overhead: step time ours / bare = {ours['step_s'] / bare['step_s']:.3f}", flush=True)
    if "hf" in args.cases and cuda:
        ours = report("hf", "Trainer(strategy='megatron')", base, args, run_ours(base, args), args.out)
        hf = report("hf", "transformers GPT2LMHeadModel", base, args, run_hf(base, args), args.out)
        print(f"tokens/s ours / transformers = {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}", flush=True)
    if "compile" in args.cases and cuda:
        for preset in args.presets:
            config = getattr(lm.GPTConfig, preset)(seq_length=seq)
            eager = report("compile", f"{preset} eager", config, args, run_ours(config, args), args.out)
            compiled = report("compile", f"{preset} compile_layers", config, args,
                              run_ours(config, args, compile_layers=True), args.out)
            print(f"{preset}: tokens/s compiled / eager = {compiled['tokens_per_s'] / eager['tokens_per_s']:.3f}",
                  flush=True)
    if "mfu" in args.cases and cuda:
        for preset in args.presets:
            config = getattr(lm.GPTConfig, preset)(seq_length=seq)
            report("mfu", preset, config, args, run_ours(config, args), args.out)
    if "memory" in args.cases and cuda:
        config = lm.GPTConfig.gpt2_350m(seq_length=seq)
        variants = {
            "no recompute": {},
            "selective recompute": {"recompute_granularity": "selective"},
            "full recompute": {"recompute_granularity": "full", "recompute_method": "uniform",
                               "recompute_num_layers": 1},
            "distributed optimizer": {"use_distributed_optimizer": True},
        }
        for name, kwargs in variants.items():
            recompute = config.num_layers if kwargs.get("recompute_granularity") == "full" else 0
            report("memory", name, config, args, run_ours(config, args, **kwargs), args.out,
                   recompute_layers=recompute)


if __name__ == "__main__":
    main()
