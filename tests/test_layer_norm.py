"""Our Triton LayerNorm kernels compute torch's LayerNorm: output, input, weight and bias gradients. GPUs run them
compiled (``tests/test_training_gpu.py``); here Triton's interpreter runs the same kernels on the CPU."""

import os
import subprocess
import sys
import textwrap

import pytest

from launch import REPO

CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F

    from lightning_megatron.models import layer_norm

    layer_norm._multiprocessors = lambda device: 3  # a few programs, so that each sums several rows
    for shape, dtype in [((16, 4, 256), torch.float32), ((7, 1000), torch.float32), ((3, 1, 5), torch.float32),
                         ((33, 96), torch.bfloat16)]:
        torch.manual_seed(0)
        width = shape[-1]
        weight, bias = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        grad = torch.randn(shape).to(dtype)

        def run(norm, dt):
            inputs = [t.to(dt).clone().requires_grad_() for t in (x, weight, bias)]
            out = norm(*inputs)
            out.backward(grad.to(dt))
            return [out.double()] + [t.grad.double() for t in inputs]

        exact = run(lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), torch.float64)
        torchs = run(lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), dtype)
        ours = run(lambda x, w, b: layer_norm._LayerNorm.apply(x, w, b, 1e-5), dtype)
        for name, want, theirs, got in zip(("output", "input grad", "weight grad", "bias grad"), exact, torchs, ours):
            # As close to the float64 result as torch's own kernel is, within a rounding of the dtype.
            slack = 1e-5 if dtype == torch.float32 else 0.07
            error, torch_error = (got - want).abs().max().item(), (theirs - want).abs().max().item()
            assert error <= 2 * torch_error + slack, f"{shape} {dtype} {name}: {error} against torch's {torch_error}"
    print("kernels match")
""")


def test_triton_kernels_compute_torchs_layer_norm_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux)")
    # A process of its own: the interpreter is chosen when the kernels are built, once per process.
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "kernels match" in result.stdout, result.stderr[-3000:]
