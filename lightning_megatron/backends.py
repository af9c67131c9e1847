"""Which optional backends this process can use, detected once, in one place."""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE: bool = _importable("transformer_engine")
"""Transformer Engine is installed (fp8, TE layer specs, ring attention for context parallelism)."""

HAVE_TRITON: bool = _importable("triton")
"""Triton is installed (it comes with CUDA builds of torch): the decode matrix-vector kernel (``generation/gemv.py``)."""

def _foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, per_tensor: bool, *args):
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, scale: float) -> None:
    torch._foreach_copy_(tensor_lists[1], torch._foreach_mul(tensor_lists[0], scale))


def _grad_norm_on_device(grads_for_norm: list | torch.Tensor, norm_type: float = 2,
                         grad_stats_parallel_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """megatron's ``get_grad_norm_fp32`` for the 2-norm, left on the device (a 0-dim float64 tensor)."""
    grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
    if norm_type != 2 or any(isinstance(grad, DTensor) for grad in grads):
        from megatron.core.optimizer import clip_grads

        return clip_grads.get_grad_norm_fp32(grads, norm_type, grad_stats_parallel_group)
    if grads:
        total = _foreach_l2_norm(0, None, [grads], False)[0] ** 2
    else:
        total = torch.zeros(1, dtype=torch.float32, device=torch.cuda.current_device())
    dist.all_reduce(total, group=grad_stats_parallel_group)
    return total.double().sqrt().reshape(())


def _clip_on_device(parameters: list | torch.Tensor, max_norm: float, total_norm: torch.Tensor | float,
                    use_decoupled_grad: bool = False) -> None:
    """megatron's ``clip_grad_by_total_norm_fp32`` with the clip coefficient kept on the device: gradients are
    scaled by ``min(1, max_norm / (norm + 1e-6))``, which leaves them unchanged where megatron skips the scaling."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    name = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, name).detach() for p in params if getattr(p, name, None) is not None]
    if grads:
        coefficient = (max_norm / (torch.as_tensor(total_norm, dtype=torch.float64) + 1.0e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coefficient.to(device=grads[0].device, dtype=torch.float32))


def use_foreach_multi_tensor_kernels() -> None:
    """Give megatron's optimizer torch's foreach kernels where it would fall back to per-tensor Python loops, and
    keep its gradient norm and clipping on the device.

    Without Apex or Transformer Engine, megatron-core's fallback gradient norm reads every tensor's norm back to the
    host (one device sync per parameter) and scales tensors one by one; on small and medium models that leaves the
    GPU idle for much of each step. Its clipping then reads the global norm back to decide whether to scale; here
    the norm stays a device tensor (the value logged as ``grad_norm``) and the scaling is
    ``min(1, max_norm / norm)``, the same arithmetic without the read-back. Apex's and TE's fused kernels, when
    present, are left alone (and so is megatron's clipping with them).

    The patch is process-wide and stays for the life of the process (megatron's module attributes are replaced,
    for every model in it); calling it again changes nothing.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        optimizer.get_grad_norm_fp32 = _grad_norm_on_device
        optimizer.clip_grad_by_total_norm_fp32 = _clip_on_device
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _foreach_scale
    if optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        optimizer.multi_tensor_scale_impl = _foreach_scale


class _TorchWgradAccumulation:
    """Apex's ``fused_weight_gradient_mlp_cuda`` in torch: the weight-gradient GEMM accumulates straight into the
    parameter's ``main_grad`` (cuBLAS with beta=1 and an fp32 output for bf16/fp16 inputs), where megatron would
    otherwise write a bf16 gradient, copy it into ``param.grad`` and add it to ``main_grad`` in two more passes."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def fuse_wgrad_accumulation() -> bool:
    """Make megatron's ``gradient_accumulation_fusion`` runnable without Apex (process-wide, idempotent): with
    Apex its kernel is used, else :class:`_TorchWgradAccumulation`; ``False`` where this torch cannot do it."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return True
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    layers.fused_weight_gradient_mlp_cuda = _TorchWgradAccumulation
    layers._grad_accum_fusion_available = True
    return True
