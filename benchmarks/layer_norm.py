"""LayerNorm, forward and forward + backward: our Triton kernels (``models.layer_norm``) against torch's.

On the rows of GPT-2 124M at micro batch 8 and of the 1.3B preset at micro batch 16 (sequence 1024, bf16), times
``FusedLayerNorm`` (what ``GPTConfig(layer_norm_fusion=True)`` builds) and ``torch.nn.LayerNorm`` and prints
milliseconds per call, torch's time over ours, the bandwidth each reaches (the bytes a call must move: input and
output forward; input, output gradient and input gradient backward) and the largest difference from torch. Two
clocks: the GPU's (``triton.testing.do_bench``: CUDA events around calls queued back to back, what a step whose host
runs ahead of the GPU pays) and one call alone between synchronisations (host launch time included, what a
host-bound step pays).

GPU only:   python benchmarks/layer_norm.py [--out rows.jsonl]
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from lightning_megatron.models.layer_norm import FusedLayerNorm
from matvec import append_row, kernel_benchmark_args, median_ms

# [sequence, micro batch, hidden]
SHAPES = {"124M mb8": (1024, 8, 768), "1.3B mb16": (1024, 16, 2048)}
NORMS = {"ours (Triton)": FusedLayerNorm, "torch LayerNorm": torch.nn.LayerNorm}


def main() -> None:
    args = kernel_benchmark_args(__doc__, "layer_norm.py")
    hardware = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    print(f"LayerNorm on {hardware}, bf16, milliseconds per call")
    for name, shape in SHAPES.items():
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        size = x.numel() * x.element_size()
        times, outputs = {}, {}
        for label, cls in NORMS.items():
            norm = cls(shape[-1], device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                outputs[label] = norm(x).float()
            forward, both = lambda: norm(x), lambda: norm(x).backward(grad)
            with torch.no_grad():
                times[label] = {"forward": do_bench(forward), "forward_alone": median_ms(forward)}
            times[label] |= {"forward_backward": do_bench(both), "forward_backward_alone": median_ms(both)}
        ours = times["ours (Triton)"]
        difference = (outputs["ours (Triton)"] - outputs["torch LayerNorm"]).abs().max().item()
        for label, ms in times.items():
            print(f"{name:<10} {label:<15} GPU: forward {ms['forward']:6.3f} ms "
                  f"({ms['forward'] / ours['forward']:4.2f}x ours, {2 * size / ms['forward'] / 1e9:4.2f} TB/s), "
                  f"forward + backward {ms['forward_backward']:6.3f} "
                  f"ms ({ms['forward_backward'] / ours['forward_backward']:4.2f}x ours, "
                  f"{5 * size / ms['forward_backward'] / 1e9:4.2f} TB/s); one call alone: forward "
                  f"{ms['forward_alone']:6.3f} ms, forward + backward {ms['forward_backward_alone']:6.3f} ms")
        print(f"{name:<10} largest difference of the outputs from torch's: {difference:.3g}")
        append_row(args.out, {"shape": name, "input": list(shape), "hardware": hardware, "ms": times,
                              "max_abs_difference": difference})


if __name__ == "__main__":
    main()
