"""Importing the package registers the strategy under the name users type."""

import lightning as L
from lightning.pytorch.strategies import StrategyRegistry

import lightning_megatron as lm


def test_strategy_name_resolves_to_megatron_strategy():
    assert "megatron" in StrategyRegistry
    trainer = L.Trainer(strategy="megatron", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, lm.MegatronStrategy)


def test_precision_flag_becomes_megatron_precision():
    trainer = L.Trainer(strategy="megatron", accelerator="cpu", devices=1, precision="bf16-mixed", logger=False)
    plugin = trainer.strategy.precision_plugin
    assert isinstance(plugin, lm.MegatronPrecision)
    assert plugin.transformer_fields()["bf16"] is True
