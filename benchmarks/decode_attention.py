"""A decode step's attention: our Triton kernel (cache write + attention, one launch) against the torch path.

The torch path is what decode steps ran before: two ``index_copy_`` writes of the new key/value into the cache and
SDPA with an additive mask over the cache. For each shape, 24 distinct caches (like 24 layers, so that keys are read
from device memory rather than L2) are processed in turn inside a CUDA graph. Prints microseconds per layer for the
torch path, for our kernel with the default number of key splits and with each forced split count, and the ratio
torch / ours (default splits).

GPU only:   python benchmarks/decode_attention.py [--out rows.jsonl]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lightning_megatron.generation import decode_attention as A
from matvec import append_row, graph_time, kernel_benchmark_args

# (batch, heads, head dim, cache cells, keys read)
SHAPES = {"1.3B b1 ctx256": (1, 16, 128, 256, 256), "1.3B b1 ctx2048": (1, 16, 128, 2048, 2048),
          "124M b1 ctx256": (1, 12, 64, 256, 256), "124M b64 ctx256": (64, 12, 64, 256, 256),
          "1.3B b8 ctx1024": (8, 16, 128, 1024, 1024)}
LAYERS = 24


def main() -> None:
    args = kernel_benchmark_args(__doc__, "decode_attention.py")
    device, dtype = "cuda", torch.bfloat16
    hardware = torch.cuda.get_device_name()
    A.build()
    print(f"Decode attention on {hardware}, {LAYERS} distinct caches per shape, bf16, microseconds per layer")
    for name, (batch, heads, dim, cells, kv_length) in SHAPES.items():
        caches = [(torch.randn(batch, heads, cells, dim, dtype=dtype, device=device),
                   torch.randn(batch, heads, cells, dim, dtype=dtype, device=device)) for _ in range(LAYERS)]
        qkv = torch.randn(1, batch, 3 * heads, dim, dtype=dtype, device=device)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads : 2 * heads], qkv[:, :, 2 * heads :]
        valid = torch.ones(batch, cells, dtype=torch.bool, device=device)
        position = torch.tensor([kv_length - 1], device=device)
        bias = torch.zeros(batch, 1, 1, kv_length, dtype=dtype, device=device)

        def torch_path(keys, values):
            keys.index_copy_(2, position, k.permute(1, 2, 0, 3))
            values.index_copy_(2, position, v.permute(1, 2, 0, 3))
            out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys[:, :, :kv_length],
                                                 values[:, :, :kv_length], attn_mask=bias, scale=dim**-0.5)
            return out.permute(2, 0, 1, 3).reshape(1, batch, -1)

        def ours(keys, values, splits=None):
            return A.attend_and_write(q, k, v, keys, values, valid, position, kv_length, dim**-0.5,
                                      split_count=splits)

        error = (ours(*caches[0]).float() - torch_path(*caches[0]).float()).abs().max().item()
        began = time.perf_counter()
        ours(*caches[0])
        row = {"shape": name, "batch": batch, "heads": heads, "head_dim": dim, "kv_length": kv_length,
               "max_abs_diff": error, "autotune_s": time.perf_counter() - began,
               "default_splits": A.splits(batch * heads, kv_length, A._sms),
               "torch_us": graph_time(lambda: [torch_path(*c) for c in caches]) / LAYERS,
               "ours_us": graph_time(lambda: [ours(*c) for c in caches]) / LAYERS}
        for splits in (1, 2, 4, 8, 16):
            row[f"ours_splits{splits}_us"] = graph_time(lambda: [ours(*c, splits) for c in caches]) / LAYERS
        row.update(ratio=row["torch_us"] / row["ours_us"], hardware=hardware, date=time.strftime("%Y-%m-%d"))
        forced = " ".join(f"{s}:{row[f'ours_splits{s}_us']:.2f}" for s in (1, 2, 4, 8, 16))
        print(f"{name:<17} torch {row['torch_us']:7.2f}  ours {row['ours_us']:6.2f} (splits {row['default_splits']})"
              f"  {row['ratio']:.2f}x   by splits {forced}   max diff {error:.3g}", flush=True)
        append_row(args.out, row)


if __name__ == "__main__":
    main()
