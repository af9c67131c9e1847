"""``lightning-megatron generate``: complete prompts with a trained GPT (any TP/PP layout) from the command line.

    lightning-megatron generate --ckpt runs/gpt-tiny/.../last.ckpt --prompt "In the beginning" --stream
    lightning-megatron generate --ckpt ... --config recipes/gpt-tiny.yaml --prompts-file prompts.jsonl \\
        --output completions.jsonl --devices 2 --tp 2
    lightning-megatron generate --ckpt ... --prompts-file prompts.jsonl --output completions.jsonl --devices 4 --tp 2
        (two replicas of the TP=2 model share the prompts; completions are written in prompt order)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch.distributed as dist

from lightning_megatron.atomic import atomic_write
from lightning_megatron.generation import SamplingParams, TextStreamer, build_engine
from lightning_megatron.generation.predict import completion_record, read_prompts
from lightning_megatron.generation.replicas import map_over_replicas
from lightning_megatron.generation.session import add_model_arguments, check_layout, run_inference


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags for the common :class:`SamplingParams` fields."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=64)
    group.add_argument("--min-new-tokens", type=int, default=0)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--beam-width", type=int, default=1)
    group.add_argument("--length-penalty", type=float, default=1.0)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--logprobs", action="store_true", help="record each token's log probability")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """:class:`SamplingParams` from :func:`add_sampling_arguments`'s flags (validated)."""
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        beam_width=args.beam_width, length_penalty=args.length_penalty, stop=tuple(args.stop),
        logprobs=args.logprobs,
    )
    params.validate()
    return params


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def main(argv: Sequence[str]) -> int:
    """Entry point of ``lightning-megatron generate``."""
    parser = argparse.ArgumentParser(prog="lightning-megatron generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    source = parser.add_argument_group("prompts")
    source.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    source.add_argument("--prompts-file", help=".jsonl ({'prompt': ..., <SamplingParams fields>}) or .txt")
    source.add_argument("--output", help="write completions here as jsonl")
    source.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    source.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    source.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step into one fused graph (--tp 1 --pp 1; the first tokens "
                        "wait for compilation)")
    args = parser.parse_args(list(argv))
    check_layout(parser, args)
    try:
        params = sampling_params(args)
    except ValueError as error:
        parser.error(str(error))
    items = [{"id": i, "prompt": p, "params": params} for i, p in enumerate(args.prompt)]
    if args.prompts_file:
        items += read_prompts(args.prompts_file, params)
    if not items:
        parser.error("give --prompt and/or --prompts-file")
    if args.stream and len(items) != 1:
        parser.error("--stream prints one completion as it is generated: give exactly one prompt")

    def complete(model: Any, tokenizer: Any) -> list[dict[str, Any]]:
        engine = build_engine(model, tokenizer, max_batch_size=max(args.batch_size, params.beam_width),
                              compile=args.compile)
        streamer = None
        if args.stream and _is_rank_zero():  # rank 0's replica gets the first (here: the only) prompt
            sys.stdout.write(items[0]["prompt"])
            streamer = TextStreamer()

        def run(share: list[dict[str, Any]]) -> list[dict[str, Any]]:
            outputs = engine.generate([i["prompt"] for i in share], [i["params"] for i in share], streamer=streamer)
            return [completion_record(i["id"], i["prompt"], o) for i, o in zip(share, outputs)]

        # Data-parallel replicas (--devices > tp x pp) each complete their share of the prompts.
        return map_over_replicas(items, run)

    records = run_inference(args, complete)
    if records is None:
        return 0
    if args.output:
        with atomic_write(args.output) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    if not args.stream:
        for record in records:
            print(f"{record['prompt']}{record['completion']}")
    return 0
