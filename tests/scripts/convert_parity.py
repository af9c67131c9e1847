"""Load HF directories into our models under one parallel layout; record logit differences and export them back.

Each directory holds an HF model plus ``reference.pt`` ({"inputs": {...}, "logits": tensor}) written by the test.
Run under torchrun (any world size = TP x PP) or import :func:`run` in a process with one rank. Writes, on the last
rank, JSON {dir: max |logits - reference|} to --out; global rank 0 exports each model to ``<dir>-export-<tag>``.
"""

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lightning_megatron import parallel
from lightning_megatron.convert import build_module, export_hf, load_hf, module_from_hf
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.parallel import ParallelConfig
from lightning_megatron.schedule import run_schedule


def logits_of(module, inputs: dict) -> torch.Tensor | None:
    """The module's logits for one batch (on the last pipeline stage; None elsewhere)."""
    module.collected_logits = []
    seq = module.sequence_length(inputs)
    run_schedule(module.forward_step, module.chunks, [inputs], seq, forward_only=True)
    logits, module.collected_logits = module.collected_logits, None
    return logits[0] if logits else None


def run(dirs: list[str], layout: ParallelConfig, tag: str) -> dict[str, float]:
    """Max absolute logit difference per directory (only on ranks holding the last stage)."""
    diffs = {}
    for path in dirs:
        reference = torch.load(Path(path) / "reference.pt")
        module = build_module(module_from_hf(path), layout)
        for chunk in module.chunks:
            chunk.eval()
        load_hf(module, path)
        logits = logits_of(module, reference["inputs"])
        if logits is not None:
            # Padded positions attend differently in HF and megatron; only real tokens are compared.
            valid = reference["inputs"].get("padding_mask", torch.ones(logits.shape[:-1])).bool()
            diffs[path] = float((logits.float() - reference["logits"])[valid].abs().max())
        export_hf(module, f"{path}-export-{tag}", tokenizer=path)
    return diffs


def main(collect: Callable[[list[str], ParallelConfig, str], dict] = run) -> None:
    """Set up the layout of the command line and write what ``collect(dirs, layout, tag)`` returns on the last rank."""
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
        results = collect(args.dirs, layout, f"tp{args.tp}pp{args.pp}")
        parallel.destroy()
    if dist.get_rank() == dist.get_world_size() - 1:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
