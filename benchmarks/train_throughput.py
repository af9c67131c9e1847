"""Training throughput of Trainer(strategy="megatron") against baselines run in the same process.

Cases (each prints a JSON row and appends it to --out; a case that fails prints an error row and the others run):
  overhead     our strategy vs a bare megatron-core loop on the same model (schedule + DDP + optimizer, no Lightning)
  hf           our strategy vs Hugging Face transformers GPT-2 (same shape, bf16 autocast, SDPA, fused AdamW), eager
               and compiled with torch.compile (rows named "... compile"; --no-hf-compile skips them)
  fusions      each of megatron's fusions switched on in turn, against the default (all off)
  fusions_all  every applicable fusion at once, against the default (all off)
  fusions_each_off  every applicable fusion at once, then with each switched off in turn: what each adds on top of
               the others (a row's ratio under 1 means that fusion pays)
  fused_adam   OptimConfig(fused=False) (torch's multi-tensor AdamW) against the default (its fused AdamW on GPUs)
  wgrad        DDPConfig(fuse_wgrad_accumulation=False) against the default (weight gradients accumulated in the GEMM)
  syncs        synchronising CUDA calls per training step and the Python lines they come from
  cuda_graphs  cuda_graphs=True (megatron's local CUDA graphs of every layer) with every applicable fusion on, vs
               eager; run last in a process
  mfu          our strategy on the --presets
  memory       peak memory with no / selective / full recompute and with the distributed optimizer
  compile      compile_layers=True (torch.compile of each transformer layer) vs eager, on the --presets
  lora         full fine-tuning vs LoRA rank 16 on every linear layer: trainable parameters, peak memory, tokens/s
overhead, hf, fusions, fusions_all, fusions_each_off, fused_adam, wgrad, syncs, lora and cuda_graphs use the --model preset. Every row of ours carries its tokens/s ratio to
each baseline measured earlier in the same run ("vs").

GPU:  python benchmarks/train_throughput.py --cases overhead hf fusions cuda_graphs mfu memory
CPU smoke (tiny model, overhead ratio only): python benchmarks/train_throughput.py --device cpu --cases overhead
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import statistics
import time
import traceback
import warnings
from dataclasses import asdict, replace
from typing import Callable

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import lightning_megatron as lm
from lightning_megatron.callbacks.throughput import gpt_flops_per_token, peak_tflops
from lightning_megatron.data.datamodule import MegatronDataModule
from lightning_megatron.models.config import FUSIONS
from lightning_megatron.models.lora import LoRAConfig


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


def _short_path(filename: str) -> str:
    """A file's path from its package root (``megatron/core/...``, ``lightning/...``, ``lightning_megatron/...``)."""
    installed = filename.rsplit("site-packages/", 1)
    if len(installed) == 2:
        return installed[1]
    relative = os.path.relpath(filename)
    return filename if relative.startswith("..") else relative


class SyncCensus(L.Callback):
    """Counts the synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) from the start of step ``warmup`` to
    the start of the last step, and the Python lines (outside torch) that made them."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        self.sites: collections.Counter = collections.Counter()
        self._caught: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._caught = warnings.catch_warnings()
            self._caught.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
        elif self._caught is not None:
            self.steps += 1
            if batch_idx == trainer.max_steps - 1:
                self._stop()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._caught.__exit__(None, None, None)
            self._caught = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        outside_torch = [f"{_short_path(frame.filename)}:{frame.lineno} {frame.name}"
                         for frame in traceback.extract_stack()[:-1]
                         if "/torch/" not in frame.filename and "warnings" not in frame.filename]
        self.sites[" < ".join(reversed(outside_torch[-3:]))] += 1


def median_step(times: list[float], warmup: int) -> float:
    steady = sorted(times[warmup:])
    return steady[len(steady) // 2]


def run_ours(config: lm.GPTConfig, args: argparse.Namespace, census: SyncCensus | None = None,
             lora: LoRAConfig | None = None, fused_adam: bool | None = None,
             **strategy_kwargs) -> dict:
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
        enable_progress_bar=False, enable_model_summary=False, callbacks=[census or timer], num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model = lm.GPT(config, lm.OptimConfig(lr=1e-4, warmup_steps=0, decay_steps=args.steps, fused=fused_adam),
                   lora=lora)
    trainer.fit(model, datamodule=data)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if census is not None:
        steps = max(census.steps, 1)
        del trainer, model
        return {"syncs_per_step": sum(census.sites.values()) / steps,
                "sites": [[site, count / steps] for site, count in census.sites.most_common(12)]}
    step = median_step(timer.times, args.warmup)
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if args.device == "cuda" else None
    del trainer, model
    return {"step_s": step, "peak_mem_gb": peak, "trainable_params": trainable}


def run_bare_megatron(config: lm.GPTConfig, args: argparse.Namespace) -> dict:
    """The same model trained by megatron-core's own pieces in a hand-written loop (what Megatron-LM does), with the
    read-back-free clipping and token division the strategy gives megatron, so that the ratio is the strategy's
    own overhead."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from lightning_megatron import parallel
    from lightning_megatron.backends import use_foreach_multi_tensor_kernels
    from lightning_megatron.cpu import CPUEmulation
    from lightning_megatron.optim import use_fused_adam
    from lightning_megatron.parallel import RecomputeConfig
    from lightning_megatron.precision import MegatronPrecision
    from lightning_megatron.schedule import finalize_grads
    from lightning_megatron.strategy import transformer_fields

    emulation = CPUEmulation() if args.device == "cpu" else None
    if emulation:
        emulation.__enter__()
    parallel.initialize(lm.ParallelConfig(), seed=1234)
    use_foreach_multi_tensor_kernels()
    module = lm.GPT(config)
    bf16 = args.precision.startswith("bf16")
    # The megatron config the strategy would build (precision, per-token loss, fusions, weight-gradient fusion).
    tconfig = module.transformer_config(**transformer_fields(
        lm.ParallelConfig(), MegatronPrecision(args.precision), RecomputeConfig(), torch.device(args.device),
        fuse_wgrad=True))
    model = module.build_stage(tconfig, True, True, None).to(args.device)
    if bf16:
        model = Float16Module(tconfig, model)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tconfig.finalize_model_grads_func = finalize_grads  # megatron's, without its read-back of the token count
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=1e-4, bf16=bf16, params_dtype=tconfig.params_dtype, clip_grad=1.0), [model]
    )
    if args.device == "cuda":
        use_fused_adam(optimizer)  # as OptimConfig's default does on GPUs
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


def run_hf(config: lm.GPTConfig, args: argparse.Namespace, compile: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, GPT2Config

    hf_config = GPT2Config(vocab_size=config.padded_vocab_size(), n_positions=config.seq_length, n_embd=config.hidden_size,
                           n_layer=config.num_layers, n_head=config.num_attention_heads, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    if compile:
        model = torch.compile(model)
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
    if compile:
        torch._dynamo.reset()
    return {"step_s": median_step(times, args.warmup)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU (torch {torch.__version__})"


def emit(row: dict, out: str) -> None:
    print(json.dumps(row), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def report(case: str, name: str, config: lm.GPTConfig, args: argparse.Namespace, result: dict, out: str,
           **extra) -> dict:
    tokens = args.global_batch * config.seq_length
    flops = gpt_flops_per_token(config.num_layers, config.hidden_size, config.seq_length, config.padded_vocab_size(),
                                config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size,
                                config.activation == "swiglu", extra.pop("recompute_layers", 0))
    row = {"case": case, "name": name, "hardware": hardware(args.device), "torch": torch.__version__,
           "precision": args.precision, "shape": {k: v for k, v in asdict(config).items()
                                                   if k in ("num_layers", "hidden_size", "num_attention_heads",
                                                            "seq_length", "vocab_size")},
           "global_batch": args.global_batch, "micro_batch": args.micro_batch, **extra}
    if "step_s" in result:
        row.update(tokens_per_s=tokens / result["step_s"], tflops=tokens * flops / result["step_s"] / 1e12)
        peak = peak_tflops(torch.device(args.device))
        if peak:
            row["mfu"] = row["tflops"] / peak
    row.update(result)
    emit(row, out)
    return row


class Session:
    """The rows measured so far in this run: each measurement is made once, and a failing one becomes an error
    row (and ``None``) so that the other cases still run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: dict[str, dict | None] = {}

    def measure(self, case: str, name: str, config: lm.GPTConfig, run: Callable[[], dict],
                baselines: tuple[str, ...] = (), **extra) -> dict | None:
        """``run()`` reported as ``name`` with its tokens/s ratio to each measured baseline (``vs``)."""
        if name in self.rows:
            return self.rows[name]
        try:
            result = run()
        except Exception as error:  # one failing case must not lose the others
            traceback.print_exc()
            emit({"case": case, "name": name, "hardware": hardware(self.args.device), "torch": torch.__version__,
                  "micro_batch": self.args.micro_batch, "error": f"{type(error).__name__}: {error}"[:3000]},
                 self.args.out)
            self.rows[name] = None
            return None
        finally:
            gc.collect()
            if self.args.device == "cuda":
                torch.cuda.empty_cache()
        vs = {base: self.rows[base]["step_s"] / result["step_s"] for base in baselines
              if "step_s" in result and "step_s" in (self.rows.get(base) or {})}
        self.rows[name] = row = report(case, name, config, self.args, result, self.args.out,
                                       **({"vs": vs} if vs else {}), **extra)
        return row

    def ratio(self, label: str, name: str, base: str) -> None:
        """Print ``label: tokens/s name / base`` when both were measured."""
        row, base_row = self.rows.get(name), self.rows.get(base)
        if row and base_row:
            print(f"{label}: tokens/s {name} / {base} = {base_row['step_s'] / row['step_s']:.3f}", flush=True)


def overhead_rounds(bare: dict, ours: dict, config: lm.GPTConfig, args: argparse.Namespace) -> None:
    """Print and record the strategy's step time over the bare loop's: the median of ``--overhead-rounds`` rounds
    of one run each, the first being the two rows already measured and the next ones in alternating order.

    One pair cannot resolve a few percent: the bare loop alone moved 60-79 ms per step between processes on one H200.
    """
    ratios = [ours["step_s"] / bare["step_s"]]
    for _ in range(args.overhead_rounds - 1):
        ratios.append(run_ours(config, args)["step_s"] / run_bare_megatron(config, args)["step_s"])
    median = statistics.median(ratios)
    emit({"case": "overhead", "name": "step time ours / bare", "hardware": hardware(args.device),
          "rounds": ratios, "median": median}, args.out)
    print(f"strategy overhead: step time ours / bare = {median:.3f} (median of {len(ratios)} rounds: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})", flush=True)


OURS = "Trainer(strategy='megatron')"
BARE = "bare megatron-core loop"
HF = "transformers GPT2LMHeadModel"
HF_COMPILE = "transformers GPT2LMHeadModel compile"
ALL_FUSIONS = f"{OURS} all fusions"


def all_fusions(config: lm.GPTConfig) -> lm.GPTConfig:
    """``config`` asking for every fusion (the model keeps those that apply to it): megatron's and our LayerNorm."""
    return replace(config, **dict.fromkeys(FUSIONS, True), layer_norm_fusion=True)


def applicable_fusions(config: lm.GPTConfig) -> list[str]:
    """The fusion switches that change something on this model: those its megatron config keeps when all are asked
    for, and our LayerNorm's where it has LayerNorms (see docs/models.md, "Fused kernels")."""
    megatron_config = lm.GPT(all_fusions(config)).transformer_config()
    ours = ["layer_norm_fusion"] if config.normalization == "LayerNorm" else []
    return [name for name in FUSIONS if getattr(megatron_config, name)] + ours


def fusion_variants(config: lm.GPTConfig) -> dict[str, dict]:
    """The applicable fusions, each switched on alone (the default is all off)."""
    return {f"{OURS} {name}=True": {name: True} for name in applicable_fusions(config)}


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
    parser.add_argument("--model", default=None, help="preset of the overhead, hf, fusions, syncs and cuda_graphs "
                                                      "cases (default gpt2_124m; a tiny GPT on the CPU)")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip the torch.compile'd transformers rows")
    parser.add_argument("--overhead-rounds", type=int, default=3,
                        help="rounds of (ours, bare) whose median step-time ratio is the overhead")
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

    if args.model or cuda:
        base = getattr(lm.GPTConfig, args.model or "gpt2_124m")(seq_length=seq)
    else:
        base = lm.GPTConfig.tiny(vocab_size=4096, seq_length=seq, hidden_size=64)
    print(f"# hardware: {hardware(args.device)}; precision {args.precision}; global batch {args.global_batch}, "
          f"micro batch {args.micro_batch}, seq {seq}", flush=True)
    session = Session(args)
    measure = session.measure
    # The baselines first, so that the row of ours carries its ratio to each.
    if "overhead" in args.cases:
        measure("overhead", BARE, base, lambda: run_bare_megatron(base, args))
    if "hf" in args.cases and cuda:
        measure("hf", HF, base, lambda: run_hf(base, args))
        if not args.no_hf_compile:
            measure("hf", HF_COMPILE, base, lambda: run_hf(base, args, compile=True))
    compared = ("overhead", "hf", "fusions", "fusions_all", "fused_adam", "wgrad", "cuda_graphs")
    if set(compared) & set(args.cases):
        case = next(case for case in compared if case in args.cases)
        ours = measure(case, OURS, base, lambda: run_ours(base, args), (BARE, HF, HF_COMPILE))
        bare = session.rows.get(BARE)
        if bare and ours:
            overhead_rounds(bare, ours, base, args)
        session.ratio("ours vs transformers eager", OURS, HF)
        session.ratio("ours vs transformers compiled", OURS, HF_COMPILE)
    if "fusions" in args.cases and cuda:
        for name, switches in fusion_variants(base).items():
            config = replace(base, **switches)
            measure("fusions", name, config, lambda: run_ours(config, args), (OURS,))
            session.ratio("fusion on", name, OURS)
    if "fusions_all" in args.cases and cuda:
        fused = all_fusions(base)
        measure("fusions_all", ALL_FUSIONS, fused, lambda: run_ours(fused, args), (OURS, HF, HF_COMPILE))
        session.ratio("all fusions", ALL_FUSIONS, OURS)
    if "fusions_each_off" in args.cases and cuda:
        fused = all_fusions(base)
        measure("fusions_each_off", ALL_FUSIONS, fused, lambda: run_ours(fused, args), (OURS,))
        for switch in applicable_fusions(base):
            config, name = replace(fused, **{switch: False}), f"{ALL_FUSIONS} but {switch}"
            measure("fusions_each_off", name, config, lambda: run_ours(config, args), (ALL_FUSIONS,))
            session.ratio(f"{switch} off", name, ALL_FUSIONS)
    if "fused_adam" in args.cases and cuda:
        name = f"{OURS} OptimConfig(fused=False)"
        measure("fused_adam", name, base, lambda: run_ours(base, args, fused_adam=False), (OURS,))
        session.ratio("multi-tensor Adam", name, OURS)
    if "wgrad" in args.cases and cuda:
        name = f"{OURS} DDPConfig(fuse_wgrad_accumulation=False)"
        measure("wgrad", name, base, lambda: run_ours(base, args, fuse_wgrad_accumulation=False), (OURS,))
        session.ratio("weight gradients accumulated outside the GEMM", name, OURS)
    if "syncs" in args.cases and cuda:
        census = SyncCensus(args.warmup)
        measure("syncs", f"{OURS} synchronising CUDA calls", base, lambda: run_ours(base, args, census=census))
    if "compile" in args.cases and cuda:
        for preset in args.presets:
            config = getattr(lm.GPTConfig, preset)(seq_length=seq)
            measure("compile", f"{preset} eager", config, lambda: run_ours(config, args))
            measure("compile", f"{preset} compile_layers", config, lambda: run_ours(config, args, compile_layers=True),
                    (f"{preset} eager",))
            session.ratio(preset, f"{preset} compile_layers", f"{preset} eager")
    if "mfu" in args.cases and cuda:
        for preset in args.presets:
            config = getattr(lm.GPTConfig, preset)(seq_length=seq)
            measure("mfu", preset, config, lambda: run_ours(config, args))
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
            measure("memory", name, config, lambda: run_ours(config, args, **kwargs), recompute_layers=recompute)
    if "lora" in args.cases and cuda:
        measure("lora", f"{OURS} full fine-tuning", base, lambda: run_ours(base, args))
        adapters = LoRAConfig(rank=16, alpha=32)
        lora_name = f"{OURS} LoRA rank 16 (qkv, proj, fc1, fc2)"
        measure("lora", lora_name, base, lambda: run_ours(base, args, lora=adapters), (f"{OURS} full fine-tuning",))
        session.ratio("LoRA vs full fine-tuning", lora_name, f"{OURS} full fine-tuning")
    if "cuda_graphs" in args.cases and cuda:
        # Last: megatron's graphs and the side stream they run on are process-wide.
        name = f"{OURS} cuda_graphs, all fusions"
        fused = all_fusions(base)
        measure("cuda_graphs", name, fused, lambda: run_ours(fused, args, cuda_graphs=True),
                (OURS, BARE, HF, HF_COMPILE))
        session.ratio("cuda graphs", name, OURS)
        session.ratio("cuda graphs vs transformers eager", name, HF)
        session.ratio("cuda graphs vs transformers compiled", name, HF_COMPILE)


if __name__ == "__main__":
    main()
