"""Load HF directories into our models under one parallel layout and record the greedy tokens they generate.

Run under torchrun (any world size = TP x PP) or import :func:`greedy_tokens` in a process with one rank. Writes, on
global rank 0, JSON {dir: [tokens of each prompt in PROMPTS]} to --out.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_megatron import parallel
from lightning_megatron.convert import build_module, load_hf, module_from_hf
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.generation import SamplingParams, generate
from lightning_megatron.parallel import ParallelConfig

PROMPTS = [[5, 17, 42, 7, 99], [100, 3]]
NEW_TOKENS = 10


def greedy_tokens(path: str, layout: ParallelConfig) -> list[list[int]]:
    """The greedy continuations of PROMPTS (batched together) by the HF model at ``path`` converted to ours."""
    module = build_module(module_from_hf(path), layout)
    load_hf(module, path)
    outputs = generate(module, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return [output.tokens for output in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    layout = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    dist.init_process_group("gloo")
    with CPUEmulation():
        parallel.initialize(layout, seed=1)
        tokens = {path: greedy_tokens(path, layout) for path in args.dirs}
        parallel.destroy()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(tokens))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
