"""Our Triton LayerNorm kernels compute torch's LayerNorm: output, input, weight and bias gradients. The same check
runs the kernels compiled on a GPU and in Triton's interpreter on the CPU."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from launch import REPO

SHAPES = [((16, 4, 256), torch.float32), ((7, 1000), torch.float32), ((3, 1, 5), torch.float32),
          ((33, 96), torch.bfloat16), ((1024, 4, 2048), torch.bfloat16)]


def assert_kernels_match_torch(device: str) -> None:
    """Every shape: our kernels are as close to the float64 LayerNorm as torch's own kernel is, within a rounding of
    the dtype (bf16's last bit at the outputs' size)."""
    from lightning_megatron.models import layer_norm

    for shape, dtype in SHAPES:
        torch.manual_seed(0)
        width = shape[-1]
        weight, bias = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        grad = torch.randn(shape).to(dtype)

        def run(norm, dt):
            inputs = [t.to(device, dt).clone().requires_grad_() for t in (x, weight, bias)]
            out = norm(*inputs)
            out.backward(grad.to(device, dt))
            return [out.double()] + [t.grad.double() for t in inputs]

        exact = run(lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), torch.float64)
        torchs = run(lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), dtype)
        ours = run(lambda x, w, b: layer_norm._LayerNorm.apply(x, w, b, 1e-5), dtype)
        for name, want, theirs, got in zip(("output", "input grad", "weight grad", "bias grad"), exact, torchs, ours):
            slack = 1e-5 if dtype == torch.float32 else 0.07
            error, torch_error = (got - want).abs().max().item(), (theirs - want).abs().max().item()
            assert error <= 2 * torch_error + slack, f"{shape} {dtype} {name}: {error} against torch's {torch_error}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_triton_kernels_compute_torchs_layer_norm_on_gpus():
    from lightning_megatron.models.layer_norm import FusedLayerNorm, usable

    norm = FusedLayerNorm(2048, device="cuda", dtype=torch.bfloat16)
    assert usable(torch.ones(4, 2048, device="cuda", dtype=torch.bfloat16), norm.weight, norm.bias)
    assert_kernels_match_torch("cuda")


def test_triton_kernels_compute_torchs_layer_norm_in_the_interpreter():
    triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux)")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot loop to a bound passed at run time (3.7 can)")
    # A process of its own: the interpreter is chosen when the kernels are built, once per process. A few programs
    # (3 "multiprocessors"), so that each sums several rows.
    check = ("from lightning_megatron.models import layer_norm; layer_norm._multiprocessors = lambda device: 3; "
             "import test_layer_norm; test_layer_norm.assert_kernels_match_torch('cpu'); print('kernels match')")
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, path))}
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "kernels match" in result.stdout, result.stderr[-3000:]
