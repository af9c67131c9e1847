"""Text generation with a GPT trained under any tensor/pipeline layout: sampling, beams, batching, streaming.

``generate(model, prompts, SamplingParams(...), tokenizer=...)`` decodes with a built GPT on every rank of the model
replica together; :class:`Engine` is the continuous-batching loop the server drives.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from lightning_megatron.generation.engine import Engine
from lightning_megatron.generation.requests import GenerationOutput
from lightning_megatron.generation.params import SamplingParams
from lightning_megatron.generation.quantize import quantize as quantize_weights
from lightning_megatron.generation.runner import ModelRunner
from lightning_megatron.generation.stream import TextStreamer, TextTracker, TokenEvent


def build_engine(model: Any, tokenizer: Any | None = None, max_batch_size: int = 16, use_cache: bool = True,
                 cuda_graphs: bool | None = None, compile: bool = False, quantize: str | None = None,
                 kernels: bool = True, **kwargs: Any) -> Engine:
    """An :class:`Engine` over a built GPT (``configure_model`` done, e.g. inside a Trainer run).

    ``cuda_graphs``/``compile``/``kernels``: see :class:`ModelRunner` (graphs default to on where one CUDA process
    holds the model).
    ``quantize="int8"`` first quantizes the model's linear weights in place (:func:`.quantize.quantize`).
    """
    if model.chunks is None:
        raise RuntimeError("the model is not built yet: generate inside a Trainer run (fit/predict) or after "
                           "configure_model() with megatron's parallel state initialised")
    if quantize is not None:
        quantize_weights(model, quantize)
    runner = ModelRunner(model.chunks, model.config.vocab_size, cuda_graphs=cuda_graphs, compile=compile,
                         kernels=kernels)
    return Engine(runner, model.config.seq_length, tokenizer=tokenizer, max_batch_size=max_batch_size,
                  use_cache=use_cache, **kwargs)


def generate(model: Any, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, tokenizer: Any | None = None,
             use_cache: bool = True, max_batch_size: int | None = None,
             streamer: Callable[[TokenEvent], Any] | None = None) -> list[GenerationOutput]:
    """Generate from one prompt or many (text or token ids); every rank of the model replica calls it together.

    Prompts of any lengths share batches of up to ``max_batch_size`` sequences (default: all of them).
    ``streamer`` (e.g. :class:`TextStreamer`) receives every :class:`TokenEvent` as it happens. Returns one output
    per prompt, in order.
    """
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompts = list(prompts)
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
    width = sum(p.beam_width for p in per_prompt)
    engine = build_engine(model, tokenizer, max_batch_size=max_batch_size or max(width, 1), use_cache=use_cache)
    return engine.generate(prompts, per_prompt, streamer=streamer)


__all__ = [
    "Engine",
    "GenerationOutput",
    "ModelRunner",
    "SamplingParams",
    "TextStreamer",
    "TextTracker",
    "TokenEvent",
    "build_engine",
    "generate",
    "quantize_weights",
]
