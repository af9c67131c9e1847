"""The attention's QKV projection, forward + backward: ours (the bias added inside the GEMM) against megatron-core's.

For GPT-2 124M at micro batch 8 and the 1.3B preset at micro batch 16 (sequence 1024, bf16), times
``layers.BiasInGemmColumnParallelLinear`` (``torch.addmm``, the bias in cuBLASLt's epilogue; what our GPT and BERT
specs build) and megatron's ``ColumnParallelLinear`` (``matmul`` and then a broadcast ``add`` over the output), both
accumulating the weight gradient into an fp32 ``main_grad`` as training does, and prints milliseconds per call for
the forward alone and for forward + backward, with megatron's time over ours.

GPU only:   python benchmarks/qkv_bias.py [--out rows.jsonl]
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.backends import fuse_wgrad_accumulation
from lightning_megatron.models.layers import BiasInGemmColumnParallelLinear
from matvec import append_row, kernel_benchmark_args, median_ms, megatron_on_one_gpu

# [sequence, micro batch, hidden]; the projection's output is 3 x hidden.
SHAPES = {"124M mb8": (1024, 8, 768), "1.3B mb16": (1024, 16, 2048)}
LAYERS = {"ours (bias in the GEMM)": BiasInGemmColumnParallelLinear, "megatron ColumnParallelLinear": ColumnParallelLinear}


def build(cls: type, hidden: int) -> ColumnParallelLinear:
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=16, params_dtype=torch.bfloat16,
                               gradient_accumulation_fusion=fuse_wgrad_accumulation())
    layer = cls(hidden, 3 * hidden, config=config, init_method=torch.nn.init.normal_, bias=True, gather_output=False)
    layer.weight.main_grad = torch.zeros_like(layer.weight, dtype=torch.float32)
    return layer


def main() -> None:
    args = kernel_benchmark_args(__doc__, "qkv_bias.py")
    hardware = megatron_on_one_gpu(29535)
    print(f"QKV projection on {hardware}, bf16, milliseconds per call")
    for name, (seq, batch, hidden) in SHAPES.items():
        x = torch.randn(seq, batch, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(seq, batch, 3 * hidden, device="cuda", dtype=torch.bfloat16)
        times = {}
        for label, cls in LAYERS.items():
            layer = build(cls, hidden)
            with torch.no_grad():
                forward = median_ms(lambda: layer(x))
            both = median_ms(lambda: layer(x)[0].backward(grad))
            times[label] = {"forward": forward, "forward_backward": both}
        ours = times["ours (bias in the GEMM)"]
        for label, ms in times.items():
            print(f"{name:<10} {label:<31} forward {ms['forward']:7.3f} ms ({ms['forward'] / ours['forward']:4.2f}x "
                  f"ours)  forward + backward {ms['forward_backward']:7.3f} ms "
                  f"({ms['forward_backward'] / ours['forward_backward']:4.2f}x ours)")
        append_row(args.out, {"shape": name, "input": [seq, batch, hidden], "hardware": hardware, "ms": times})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
