"""Where a decode step's time goes: host vs device time, kernel launches and host synchronisations per token.

Profiles (torch.profiler) our engine generating ``--new-tokens`` tokens at batch ``--batch`` and, separately, only
the first token; the difference divided by the extra tokens is one decode step. Per step it reports the wall time,
the device time (the sum of GPU kernel time), the host time (wall time minus time blocked waiting for the device),
kernel launches, CUDA graph launches and blocking synchronisations (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, and device-to-host copies that wait). Run on a GPU:

    python benchmarks/profile_decode.py --out decode_profile.json                   # CUDA graphs (default)
    python benchmarks/profile_decode.py --eager --out decode_profile_eager.json     # the same engine, no graphs
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_megatron.generation import SamplingParams, build_engine
from lightning_megatron.generation.session import run_with_model
from lightning_megatron.models.gpt import GPTConfig

BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def totals(prof: Any) -> dict[str, float]:
    """Device time, blocked host time and call counts from a finished profile."""
    out = {"device_us": 0.0, "blocked_us": 0.0, "syncs": 0, "launches": 0, "graph_launches": 0}
    for event in prof.key_averages():
        name = event.key
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out["device_us"] += event.self_device_time_total
        elif name.startswith(BLOCKING) or (name == "cudaMemcpyAsync" and event.cpu_time_total / max(event.count, 1) > 20):
            out["blocked_us"] += event.cpu_time_total
            out["syncs"] += event.count
        if name in LAUNCHES:
            out["launches"] += event.count
        if name.startswith("cudaGraphLaunch"):
            out["graph_launches"] += event.count
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2_124m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--eager", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the graphed decode step")
    parser.add_argument("--top", type=int, default=0, help="also list the N kernels that took the most time")
    parser.add_argument("--label", help="name the engine in the output (default: CUDA graphs / eager)")
    parser.add_argument("--out", help="write the per-step figures as JSON here")
    args = parser.parse_args()
    config = getattr(GPTConfig, args.preset)()
    prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_tokens)).tolist()

    def run(model: Any, tokenizer: Any) -> dict[str, Any]:
        kwargs = {"cuda_graphs": False} if args.eager else {"compile": True} if args.compile else {}
        engine = build_engine(model, None, max_batch_size=args.batch, **kwargs)

        def generate(tokens: int) -> None:
            engine.generate(prompts, SamplingParams(max_new_tokens=tokens))

        generate(args.new_tokens)  # warm-up: graph capture, kernel choice
        measured = {}
        for tokens in (1, args.new_tokens):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                generate(tokens)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
            measured[tokens] = {"wall_us": wall * 1e6, **totals(prof)}
            kernels = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                             key=lambda e: -e.self_device_time_total)
        print(f"kernels of {args.new_tokens} tokens (total device us, calls):")
        for event in kernels[: args.top]:
            print(f"  {event.self_device_time_total:10.0f} {event.count:6d}  {event.key[:100]}")
        steps = args.new_tokens - 1
        per_step = {key: (measured[args.new_tokens][key] - measured[1][key]) / steps for key in measured[1]}
        per_step["host_us"] = per_step["wall_us"] - per_step["blocked_us"]
        return per_step

    per_step = run_with_model(config, run, accelerator="gpu", precision="bf16-mixed")
    if per_step is None:
        return
    label = args.label or ("eager" if args.eager else "CUDA graphs + compile" if args.compile else "CUDA graphs")
    print(f"decode step, {args.preset}, batch {args.batch}, {label}, {torch.cuda.get_device_name()}:")
    print(f"  wall {per_step['wall_us']:.0f} us | device (kernels) {per_step['device_us']:.0f} us | host "
          f"{per_step['host_us']:.0f} us | blocked {per_step['blocked_us']:.0f} us | syncs {per_step['syncs']:.1f} | "
          f"kernel launches {per_step['launches']:.1f} | graph launches {per_step['graph_launches']:.1f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"preset": args.preset, "batch": args.batch, "mode": label,
                       "hardware": torch.cuda.get_device_name(), **per_step}, handle)


if __name__ == "__main__":
    main()
