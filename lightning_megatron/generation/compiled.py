"""``torch.compile`` of a generation step: one graph for the whole megatron-core forward, tuned for decoding.

Two helpers of megatron-core stop dynamo's tracing in every layer: the row-parallel linear layers pass
``tp_group=None`` and its fallback calls ``warnings.warn`` with a warning class (dynamo cannot trace that), and the
transformer block makes its hidden states "viewless" with ``torch.empty(..., requires_grad=True)`` (dynamo refuses
tensor factories that require grad). Each break splits the step into ~8 graphs per layer, recompiled for every layer,
and kernels cannot fuse across them. :func:`register_tracing_rules` gives dynamo a traceable stand-in for each (used
only while tracing; eager calls are unchanged), and the decode step compiles into one graph.

With int8 weights (:mod:`.quantize`) the step also turns on inductor's coordinate-descent tuning, under which a
product of a few rows becomes a Triton reduction that reads the int8 weight and dequantizes it in registers; without
it the weight is first copied to bf16. (One-row products, int8 or not, call :mod:`.gemv`'s kernel, which dynamo
keeps as it is.) bf16 products of several rows keep cuBLAS, which was faster for them than inductor's reductions.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from megatron.core import parallel_state
from megatron.core import utils as megatron_utils
from torch import Tensor

F = TypeVar("F", bound=Callable)

INT8_OPTIONS = {"coordinate_descent_tuning": True}
"""Inductor settings of compiled steps over int8 weights (see the module's docstring)."""


@functools.cache
def register_tracing_rules() -> None:
    """Register dynamo's stand-ins for megatron-core's untraceable helpers (once per process)."""
    from torch._dynamo.decorators import substitute_in_graph

    @substitute_in_graph(megatron_utils.get_tensor_model_parallel_group_if_none, skip_signature_check=True)
    def tensor_parallel_group(tp_group=None, is_expert=False, check_initialized=True):  # noqa: ANN001, ANN202
        return parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group

    # Generation runs without autograd, where a view and a viewless copy of the hidden states are the same tensor.
    @substitute_in_graph(megatron_utils.make_viewless_tensor, skip_signature_check=True)
    def viewless(inp: Tensor, requires_grad: bool, keep_graph: bool) -> Tensor:
        return inp


def compile_step(step: F, int8: bool = False) -> F:
    """``step`` compiled by ``torch.compile`` with the tracing rules (and :data:`INT8_OPTIONS` for ``int8`` weights)."""
    register_tracing_rules()
    return torch.compile(step, options=INT8_OPTIONS if int8 else None)  # type: ignore[return-value]
