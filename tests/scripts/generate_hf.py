"""Load HF directories into our models under one parallel layout and record the greedy tokens they generate.

Run under torchrun (any world size = TP x PP; arguments as convert_parity.py's) or import :func:`greedy_tokens` in a
process with one rank. Writes JSON {dir: [tokens of each prompt in PROMPTS]} to --out.
"""

from convert_parity import main
from lightning_megatron.convert import build_module, load_hf, module_from_hf
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


if __name__ == "__main__":
    main(lambda dirs, layout, tag: {path: greedy_tokens(path, layout) for path in dirs})
