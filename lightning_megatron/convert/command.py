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
    to_hf = sub.add_parser("megatron-to-hf", help="checkpoint of fit or hf-to-megatron -> HF save_pretrained directory")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint directory written by fit (any layout, e.g. "
                                                     "runs/gpt-tiny/checkpoints/last.ckpt) or by hf-to-megatron, "
                                                     "or a one-process Lightning .ckpt file")
    to_hf.add_argument("--out", required=True, help="new HF directory")
    to_hf.add_argument("--config", help="training recipe (YAML) of a fit checkpoint: its model and tokenizer "
                                        "(default: the model config the checkpoint saved, the bundled tokenizer)")
    to_hf.add_argument("--tokenizer", help="tokenizer.json or HF tokenizer directory to include (default: the "
                                           "checkpoint's own, else the recipe's, else the bundled one)")
    to_hf.add_argument("--architecture", help="HF class to write where several fit the model (BertModel: the "
                                              "encoder of a BERT without its heads)")
    to_hf.add_argument("--adapter-only", action="store_true",
                       help="write the LoRA adapters as a PEFT directory (adapter_config.json, "
                            "adapter_model.safetensors)")
    for command in (to_megatron, to_hf):
        command.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors file")
    args = parser.parse_args(list(argv))

    from lightning_megatron.convert.export import checkpoint_to_hf
    from lightning_megatron.convert.hf import hf_to_checkpoint

    shard_bytes = int(args.max_shard_size * 1024**3)
    try:
        if args.direction == "hf-to-megatron":
            out = hf_to_checkpoint(args.hf, args.out, args.tp, args.pp, shard_bytes)
        elif args.adapter_only:
            from lightning_megatron.convert.peft import checkpoint_to_peft

            out = checkpoint_to_peft(args.ckpt, args.config, args.out)
        else:
            out = checkpoint_to_hf(args.ckpt, args.out, args.config, args.tokenizer, args.architecture, shard_bytes)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
