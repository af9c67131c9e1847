"""Which optional backends this process can use, detected once, in one place."""

from __future__ import annotations

import importlib.util

import torch


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE: bool = _importable("transformer_engine")
"""Transformer Engine is installed (fp8, TE layer specs, ring attention for context parallelism)."""

def _foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, per_tensor: bool, *args):
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, scale: float) -> None:
    torch._foreach_copy_(tensor_lists[1], torch._foreach_mul(tensor_lists[0], scale))


def use_foreach_multi_tensor_kernels() -> None:
    """Give megatron's optimizer torch's foreach kernels where it would fall back to per-tensor Python loops.

    Without Apex or Transformer Engine, megatron-core's fallback gradient norm reads every tensor's norm back to the
    host (one device sync per parameter) and scales tensors one by one; on small and medium models that leaves the
    GPU idle for much of each step. Apex's and TE's fused kernels, when present, are left alone.

    The patch is process-wide and stays for the life of the process (megatron's module attributes are replaced,
    for every model in it); calling it again changes nothing.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _foreach_scale
    if optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        optimizer.multi_tensor_scale_impl = _foreach_scale
