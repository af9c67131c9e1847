"""lightning_megatron: train and serve transformer language models with megatron-core under PyTorch Lightning.

Importing the package registers ``"megatron"`` in Lightning's strategy registry, so ``Trainer(strategy="megatron")``
and ``strategy: megatron`` in a LightningCLI config work.
"""

from lightning_megatron.quiet import silence_dependency_noise

silence_dependency_noise()  # before megatron-core and Lightning are imported: some of their warnings are import-time

from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402

from lightning_megatron.errors import UserError  # noqa: E402
from lightning_megatron.models.gpt import GPT, GPTConfig  # noqa: E402
from lightning_megatron.models.lora import LoRAConfig  # noqa: E402
from lightning_megatron.module import MegatronModule  # noqa: E402
from lightning_megatron.optim import OptimConfig  # noqa: E402
from lightning_megatron.parallel import DDPConfig, LayoutError, ParallelConfig, RecomputeConfig  # noqa: E402
from lightning_megatron.precision import MegatronPrecision  # noqa: E402
from lightning_megatron.strategy import MegatronStrategy  # noqa: E402

if MegatronStrategy.strategy_name not in StrategyRegistry:
    MegatronStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"
__all__ = [
    "DDPConfig",
    "GPT",
    "GPTConfig",
    "LayoutError",
    "LoRAConfig",
    "MegatronModule",
    "MegatronPrecision",
    "MegatronStrategy",
    "OptimConfig",
    "ParallelConfig",
    "RecomputeConfig",
    "UserError",
]
