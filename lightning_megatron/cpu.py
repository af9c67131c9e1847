"""Run megatron-core on a CPU-only PyTorch, with gloo process groups.

megatron-core assumes CUDA throughout. For CPU runs (laptops, CI) the strategy enters :class:`CPUEmulation`
in ``setup_environment`` and leaves it in ``teardown``; GPU runs never touch it. Checked against megatron-core
0.16.1. While active it changes exactly these things, and nothing else:

1. The model-parallel RNG tracker is replaced by :class:`CPURNGStatesTracker` (states of the CPU generator), and
   ``tensor_parallel.random._get_cuda_rng_state``/``_set_cuda_rng_state`` read and write the CPU generator, which
   is the one dropout and activation recomputation use on the CPU.
2. ``torch.cuda.current_device`` returns the CPU device and ``torch.cuda.synchronize`` does nothing.
3. A ``TorchFunctionMode`` (:class:`_CudaToCpu`) rewrites ``device="cuda"`` / ``device=<int>`` arguments,
   ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU, and answers ``Tensor.type()`` with the CUDA type name
   (megatron's optimizers accept only ``torch.cuda.*Tensor`` parameters).
4. Function modes do not reach code that autograd runs during backward (the mode is suspended while it dispatches
   ``backward``), so the one hard-coded ``device="cuda"`` on that path - the causal mask that activation
   recomputation rebuilds, ``fused_softmax.get_default_causal_mask`` - is replaced by a CPU one. Backward-time
   buffers sized with ``torch.cuda.current_device()`` are covered by item 2.

Sequence parallelism on the local layer spec and checkpoint sharding need no emulation: the layer specs in
:mod:`lightning_megatron.models.layers` and :mod:`lightning_megatron.checkpoint` handle them for CPU and GPU alike.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode


class CPURNGStatesTracker:
    """megatron's named RNG states (data-parallel, model-parallel, expert) kept as CPU generator states."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} (seed {seed}) already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Sends every tensor megatron-core asks to put on CUDA to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return "torch.cuda." + func(*args).rsplit(".", 1)[-1]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class CPUEmulation:
    """Enter to let megatron-core run on the CPU; leave to restore everything it changed."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode: _CudaToCpu | None = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def _set(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self) -> "CPUEmulation":
        if self.active:
            return self
        from megatron.core.tensor_parallel import random as mcore_random

        self._set(mcore_random, "_CUDA_RNG_STATE_TRACKER", CPURNGStatesTracker())
        self._set(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
        self._set(mcore_random, "_get_cuda_rng_state", lambda *_, **__: torch.get_rng_state())
        self._set(mcore_random, "_set_cuda_rng_state", lambda state, *_, **__: torch.set_rng_state(state))
        # A device object rather than an index: autograd runs backward outside the function mode, where an
        # index would still mean a CUDA device.
        self._set(torch.cuda, "current_device", lambda: torch.device("cpu"))
        self._set(torch.cuda, "synchronize", lambda *_, **__: None)
        from megatron.core.fusions import fused_softmax

        self._set(fused_softmax, "get_default_causal_mask", _cpu_causal_mask)
        from megatron.core.tensor_parallel import layers

        # Its advice to set CUDA_DEVICE_MAX_CONNECTIONS (for TP/SP communication overlap) means nothing on a CPU.
        self._set(layers.linear_with_grad_accumulation_and_async_allreduce, "warned", True)
        self._mode = _CudaToCpu()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        self._mode.__exit__(*exc)
        self._mode = None
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()
