"""A tiny GPT built in the test process (one gloo rank, CPU emulation), shared by the generation/serving tests."""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import lightning_megatron as lm
from lightning_megatron import parallel
from lightning_megatron.cpu import CPUEmulation


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def cpu_process() -> Iterator[None]:
    """A one-rank gloo group and CPU emulation for megatron-core in this process; restores everything after."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with CPUEmulation():
            ensure_parallel_state()
            yield
    finally:
        parallel.destroy()
        if own_group:
            dist.destroy_process_group()


def ensure_parallel_state() -> None:
    """(Re)create megatron's TP=PP=1 state; the suite's conftest tears it down after every test."""
    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize(lm.ParallelConfig(), seed=1234)


def tiny_gpt(arch: str = "gpt2", seq_length: int = 64, attention: str = "sdpa") -> lm.GPT:
    """A 2-layer GPT with wide initial weights (varied greedy tokens), built for the current parallel state."""
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=seq_length, init_method_std=0.2,
                 attention=attention)
    if arch == "llama":
        config = lm.GPTConfig.llama(vocab_size=4096, num_query_groups=2, **shape)
    elif arch == "alibi":  # grouped-query too: ALiBi's per-head bias folds with the query heads of a group
        config = lm.GPTConfig(vocab_size=4096, position_embedding_type="alibi", num_query_groups=2, **shape)
    else:
        config = lm.GPTConfig(vocab_size=4096, **shape)
    model = lm.GPT(config)
    torch.manual_seed(0)
    model.configure_model()
    return model
