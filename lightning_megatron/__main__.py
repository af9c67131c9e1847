"""``python -m lightning_megatron`` is the ``lightning-megatron`` command."""

from lightning_megatron.cli import main

main()
