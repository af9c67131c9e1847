"""``lightning-megatron checkpoint inspect PATH``: a checkpoint's layout, step, files and tensor shapes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from lightning.fabric.utilities.types import _PATH
from megatron.core import dist_checkpointing

from lightning_megatron.checkpoint import CheckpointError, read_layout


def describe(path: _PATH) -> str:
    """A human-readable summary of a checkpoint: layout, step, files, and every tensor's global shape and size."""
    layout = read_layout(path)
    path = Path(path)
    tensors = dist_checkpointing.load_tensors_metadata(str(path))
    lines = [f"checkpoint  {path}", f"layout      {layout.describe()}",
             f"module      {layout.module}, params {layout.params_dtype}, "
             f"{'distributed ' if layout.distributed_optimizer else ''}optimizer "
             f"{'saved' if layout.has_optimizer else 'not saved'}",
             f"epoch       {layout.epoch}"]
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    lines.append(f"on disk     {_size(disk)} in {sum(1 for f in path.rglob('*') if f.is_file())} files")
    groups = {"model": [], "optimizer": []}
    for key, tensor in sorted(tensors.items()):
        groups["optimizer" if key.startswith("optimizer") else "model"].append((key, tensor))
    for name, items in groups.items():
        total = sum(_numel(t.global_shape) for _, t in items)
        lines.append(f"\n{name}: {len(items)} tensors, {total:,} elements")
        for key, tensor in items:
            numel = _numel(tensor.global_shape)
            dtype = str(tensor.dtype).replace("torch.", "")
            lines.append(f"  {key:<64} {str(tuple(tensor.global_shape)):<20} {dtype:<9}"
                         f" {_size(numel * tensor.dtype.itemsize)}")
    return "\n".join(lines)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


def main(argv: Sequence[str]) -> int:
    """``lightning-megatron checkpoint inspect PATH``: print a checkpoint's layout, step, tensor shapes and sizes."""
    parser = argparse.ArgumentParser(prog="lightning-megatron checkpoint", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print layout, step, tensor shapes and sizes")
    inspect.add_argument("path")
    args = parser.parse_args(list(argv))
    try:
        print(describe(args.path))
    except (FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}")
        return 1
    return 0
