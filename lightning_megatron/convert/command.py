"""``lightning-megatron convert``: ``hf-to-megatron`` and ``megatron-to-hf`` between directories on disk."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lightning_megatron.errors import UserError


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run one conversion; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lightning-megatron convert",
                                     description="Convert between Hugging Face and lightning_megatron checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_megatron = sub.add_parser("hf-to-megatron", help="HF save_pretrained directory -> consolidated checkpoint")
    to_megatron.add_argument("--hf", required=True, help="HF directory (config.json + safetensors)")
    to_megatron.add_argument("--out", required=True, help="new checkpoint directory")
    to_megatron.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate the model against")
    to_megatron.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate against")
    to_hf = sub.add_parser("megatron-to-hf", help="consolidated checkpoint -> HF save_pretrained directory")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint directory written by hf-to-megatron")
    to_hf.add_argument("--out", required=True, help="new HF directory")
    to_hf.add_argument("--config", help="the training recipe of a fit checkpoint (LoRA: its model.init_args.lora)")
    to_hf.add_argument("--adapter-only", action="store_true",
                       help="write the LoRA adapters as a PEFT directory (adapter_config.json, "
                            "adapter_model.safetensors)")
    for command in (to_megatron, to_hf):
        command.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors file")
    args = parser.parse_args(list(argv))

    from lightning_megatron.convert.hf import checkpoint_to_hf, hf_to_checkpoint

    shard_bytes = int(args.max_shard_size * 1024**3)
    try:
        if args.direction == "hf-to-megatron":
            out = hf_to_checkpoint(args.hf, args.out, args.tp, args.pp, shard_bytes)
        elif args.adapter_only:
            from lightning_megatron.convert.peft import checkpoint_to_peft

            if not args.config:
                parser.error("--adapter-only needs --config <the LoRA training recipe>")
            out = checkpoint_to_peft(args.ckpt, args.config, args.out)
        else:
            out = checkpoint_to_hf(args.ckpt, args.out, shard_bytes)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
