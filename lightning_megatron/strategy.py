"""MegatronStrategy: megatron-core's tensor, pipeline, context and data parallelism as a Lightning strategy.

The hooks run in Lightning's order: ``setup_environment`` validates the layout and creates the process groups,
Lightning calls the module's ``configure_model`` (which builds this rank's pipeline chunks), ``setup`` wraps the
chunks in megatron's DDP and builds megatron's optimizer. Each training step runs megatron's forward-backward
schedule inside ``training_step`` (see :mod:`lightning_megatron.schedule`); the precision plugin's ``backward``
is therefore empty and its ``optimizer_step`` calls megatron's ``optimizer.step()``. No Lightning loop is replaced.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator, Literal, Mapping

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.types import LRSchedulerConfig
from megatron.core import parallel_state
from megatron.core.transformer.cuda_graphs import delete_cuda_graphs
from megatron.core.utils import get_batch_on_this_cp_rank
from typing_extensions import override

from lightning_megatron import checkpoint as ckpt
from lightning_megatron import parallel, preflight
from lightning_megatron.backends import fuse_wgrad_accumulation, use_foreach_multi_tensor_kernels
from lightning_megatron.cpu import CPUEmulation
from lightning_megatron.errors import UserError
from lightning_megatron.models.config import FUSIONS
from lightning_megatron.module import MegatronModule
from lightning_megatron.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    load_optimizer_state,
    optimizer_sharded_state_dict,
)
from lightning_megatron.parallel import DDPConfig, LayoutError, ParallelConfig, RecomputeConfig
from lightning_megatron.precision import MegatronPrecision, to_megatron_precision
from lightning_megatron.schedule import (
    EmptyBatchCheck,
    StepResult,
    batch_size_of,
    finalize_grads,
    run_schedule,
    split_microbatches,
)
from lightning_megatron.threads import set_threads


def transformer_fields(parallel_config: ParallelConfig, precision: MegatronPrecision, recompute: RecomputeConfig,
                       device: torch.device, cuda_graphs: bool = False, fuse_wgrad: bool = False) -> dict[str, Any]:
    """What a run decides in every model's ``TransformerConfig``: layout, precision, recomputation, loss reduction,
    CUDA graphs, and what the device can do (``fuse_wgrad``: see :attr:`DDPConfig.fuse_wgrad_accumulation`; asking
    for it on a GPU installs a torch stand-in for Apex's kernel, :func:`backends.fuse_wgrad_accumulation`,
    which megatron's linear layers look for when built). The strategy and
    :func:`lightning_megatron.convert.build_module` both build from it."""
    cuda = device.type == "cuda"
    if cuda_graphs and not cuda:
        raise UserError("cuda_graphs=True needs a GPU (CUDA graphs); leave MegatronStrategy(cuda_graphs=...) off "
                        "for CPU runs")
    return {
        **parallel_config.transformer_fields(),
        **precision.transformer_fields(),
        **recompute.transformer_fields(),
        "calculate_per_token_loss": True,
        # gloo matches point-to-point messages between two ranks in posting order, so megatron's batched
        # send/recv (all four directions at once) pairs a gradient with an activation when PP=2 interleaves;
        # its unbatched path orders sends and receives by rank parity instead.
        "batch_p2p_comm": cuda,
        # megatron-core's fused kernels are torch.compile/JIT fusions that pay off on GPUs only: CPU runs keep the
        # unfused math, GPU runs the fusions the model config leaves on (see ModelConfig).
        **({} if cuda else dict.fromkeys(FUSIONS, False)),
        **({"cuda_graph_impl": "local"} if cuda_graphs else {}),
        "gradient_accumulation_fusion": cuda and fuse_wgrad and fuse_wgrad_accumulation(),
    }


def _given_or_flat(name: str, given: Any, flat: Any) -> Any:
    """``given`` (a config object) or the config built from the flat keyword arguments, but not both."""
    if given is None:
        return flat
    if flat != type(flat)():
        raise UserError(f"pass MegatronStrategy either {name}=... or its flat keyword arguments, not both")
    return given


class MegatronStrategy(ParallelStrategy):
    """Train :class:`~lightning_megatron.module.MegatronModule` models with megatron-core's parallelism.

    Data parallelism is the world size divided by tensor x pipeline x context parallelism. Each data-parallel rank's
    batch is split into microbatches of the datamodule's ``micro_batch_size`` samples, which megatron's schedule
    runs as gradient accumulation. The layout, recomputation and DDP options come as :class:`ParallelConfig`,
    :class:`RecomputeConfig` and :class:`DDPConfig` (``parallel_config=``, ``recompute=``, ``ddp=``) or as the flat keyword
    arguments that YAML recipes use (``tensor_model_parallel_size``, ``recompute_granularity``, ...), not both.
    ``compile_layers`` runs each transformer layer through ``torch.compile``; ``cuda_graphs`` replays each layer's
    forward and backward from CUDA graphs (megatron-core's local implementation, GPU only). See docs/parallelism.md
    and docs/performance.md for every knob and what it costs.
    """

    strategy_name = "megatron"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: int | None = None,
        context_parallel_size: int = 1,
        sequence_parallel: bool = False,
        use_distributed_optimizer: bool = False,
        overlap_grad_reduce: bool = False,
        overlap_param_gather: bool = False,
        fuse_wgrad_accumulation: bool = True,
        recompute_granularity: Literal["selective", "full"] | None = None,
        recompute_method: Literal["uniform", "block"] | None = None,
        recompute_num_layers: int | None = None,
        compile_layers: bool = False,
        cuda_graphs: bool = False,
        async_save: bool = False,
        ckpt_load_optimizer: bool = True,
        seed: int | None = None,
        parallel_config: ParallelConfig | None = None,
        recompute: RecomputeConfig | None = None,
        ddp: DDPConfig | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: MegatronPrecision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self.parallel_config: ParallelConfig = _given_or_flat("parallel_config", parallel_config, ParallelConfig(
            tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size,
            context_parallel_size, sequence_parallel))
        self.recompute: RecomputeConfig = _given_or_flat("recompute", recompute, RecomputeConfig(
            recompute_granularity, recompute_method, recompute_num_layers))
        self.ddp: DDPConfig = _given_or_flat("ddp", ddp, DDPConfig(
            use_distributed_optimizer, overlap_grad_reduce, overlap_param_gather, fuse_wgrad_accumulation))
        self.async_save = async_save
        self.ckpt_load_optimizer = ckpt_load_optimizer
        self.compile_layers = compile_layers
        self.cuda_graphs = cuda_graphs
        self.seed = seed
        self.num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._cpu = CPUEmulation()
        self._clip_grad: float | None = None
        self._micro_batch_size: int | None = None
        self._empty_batches = EmptyBatchCheck()

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def precision_plugin(self) -> MegatronPrecision:
        plugin = self._precision_plugin
        if not isinstance(plugin, MegatronPrecision):
            self._precision_plugin = plugin = to_megatron_precision(plugin)
        return plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        self._precision_plugin = None if plugin is None else to_megatron_precision(plugin)

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    @override
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def data_parallel_size(self) -> int:
        """Replicas of the model, i.e. the number of ranks that see different data."""
        return self.parallel_config.data_parallel_size(self.world_size)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Shard data by data-parallel rank only: TP, PP and CP ranks of one replica read the same samples."""
        return {
            "num_replicas": parallel_state.get_data_parallel_world_size(),
            "rank": parallel_state.get_data_parallel_rank(),
        }

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores megatron's optimizer itself

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        return True

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    # ------------------------------------------------------------------ environment
    @override
    def setup_environment(self) -> None:
        """Validate everything that could hang a collective, then create the process groups."""
        super().setup_environment()
        self._set_world_ranks()
        set_threads(self.num_processes, self.root_device.type)
        self._validate()
        if self.root_device.type == "cpu":
            self._cpu.__enter__()
        reset_seed()
        backend = self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, backend, **kwargs)
        parallel.initialize(self.parallel_config, self._seed(), cudagraphable_rng=self.cuda_graphs)
        use_foreach_multi_tensor_kernels()

    def _set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 1234))

    def _validate(self) -> None:
        """Raise on every rank, before any collective, for layouts and batch sizes that cannot work."""
        env_world = self.cluster_environment.world_size() if self.cluster_environment is not None else None
        if env_world is not None and env_world != self.world_size:
            raise LayoutError(
                f"the launcher started {env_world} processes but the Trainer expects devices x num_nodes = "
                f"{self.world_size}; make Trainer(devices=..., num_nodes=...) match the launch"
            )
        self.parallel_config.validate(self.world_size)
        if self.root_device.type == "cpu" and (self.ddp.overlap_grad_reduce or self.ddp.overlap_param_gather):
            raise LayoutError(
                "overlap_grad_reduce / overlap_param_gather need CUDA streams; turn them off for CPU runs"
            )
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        module = self.lightning_module
        if not isinstance(module, MegatronModule):
            raise TypeError(
                f"the megatron strategy trains subclasses of lightning_megatron.MegatronModule, got "
                f"{type(module).__name__}; see docs/module-contract.md"
            )
        config = module.transformer_config(**self.transformer_fields())
        self.parallel_config.validate_model(config.num_layers, config.num_attention_heads, config.num_query_groups)
        if trainer is None:
            return
        if trainer.accumulate_grad_batches != 1:
            raise LayoutError(
                "accumulate_grad_batches is not used with the megatron strategy: gradient accumulation is the "
                "number of microbatches. Remove it and set the datamodule's global_batch_size (and micro_batch_size)"
            )
        if trainer.gradient_clip_val is not None:
            self._clip_grad = float(trainer.gradient_clip_val)
        datamodule = trainer.datamodule
        preflight.check_model_fits_data(module, datamodule)
        seq_length = getattr(datamodule, "seq_length", None)
        if seq_length is not None:
            self.parallel_config.check_sequence_length(seq_length)
        self._micro_batch_size = getattr(datamodule, "micro_batch_size", None)
        global_batch = getattr(datamodule, "global_batch_size", None)
        schedule = getattr(datamodule, "batch_sizes", None)
        sizes = schedule.sizes() if schedule is not None else [global_batch] if global_batch is not None else []
        micro = self._micro_batch_size or 1
        per_step = micro * self.data_parallel_size
        for size in sizes:
            if size % per_step:
                name = "global_batch_size" if size == global_batch else "a ramp-up global batch size"
                raise LayoutError(
                    f"{name}={size} is not divisible by micro_batch_size ({micro}) x data parallel size "
                    f"({self.data_parallel_size}) = {per_step}; choose batch sizes that are multiples of {per_step}"
                )

    def transformer_fields(self) -> dict[str, Any]:
        """What this strategy decides in every model's ``TransformerConfig`` (see :func:`transformer_fields`)."""
        return transformer_fields(self.parallel_config, self.precision_plugin, self.recompute, self.root_device,
                                  self.cuda_graphs, self.ddp.fuse_wgrad_accumulation)

    # ------------------------------------------------------------------ model and optimizer
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Move the chunks to the device, cast them to the training dtype, and when fitting wrap them in megatron's
        DDP and build the optimizer (evaluation and inference hold no gradient buffers)."""
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert isinstance(module, MegatronModule) and module.chunks is not None
        self.model_to_device()
        if self.compile_layers:
            parallel.compile_layers(module.chunks)
        config = module.megatron_config
        fitting = trainer.state.fn == TrainerFn.FITTING
        module.chunks = torch.nn.ModuleList(
            parallel.wrap_chunks(module.chunks, config, self.ddp.megatron() if fitting else None))
        self.model = module
        if fitting:
            config.finalize_model_grads_func = finalize_grads
            if self.ddp.overlap_grad_reduce:
                no_sync = [chunk.no_sync for chunk in module.chunks]
                config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            self.setup_optimizers(trainer)
            optimizer = self.optimizers[0]
            config.grad_scale_func = optimizer.scale_loss
            if self.ddp.overlap_param_gather:
                config.param_sync_func = [chunk.start_param_sync for chunk in module.chunks]
                if len(module.chunks) == 1:
                    config.param_sync_func = config.param_sync_func[0]

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        assert isinstance(module, MegatronModule) and module.chunks is not None
        optim = call._call_lightning_module_hook(trainer, "configure_optimizers", pl_module=module)
        if not isinstance(optim, OptimConfig):
            raise TypeError(
                f"configure_optimizers must return a lightning_megatron.OptimConfig under the megatron strategy, got "
                f"{type(optim).__name__}; megatron's optimizer is built from it by the strategy"
            )
        extra = {} if self._clip_grad is None else {"clip_grad": self._clip_grad}
        if extra:
            optim = OptimConfig(**{**optim.__dict__, **extra})
        optimizer = build_optimizer(optim, module.chunks, self.ddp.use_distributed_optimizer,
                                    self.precision_plugin.optimizer_fields())
        scheduler = build_scheduler(optim, optimizer, trainer.max_steps)
        self.optimizers = [optimizer]
        self.lr_scheduler_configs = [LRSchedulerConfig(scheduler, interval="step", name="lr")]

    @property
    @override
    def optimizers(self) -> list[Any]:
        return self._optimizers

    @optimizers.setter
    def optimizers(self, optimizers: list[Any]) -> None:
        self._optimizers = optimizers
        self._lightning_optimizers = [LightningOptimizer._to_lightning_optimizer(opt, self) for opt in optimizers]

    # ------------------------------------------------------------------ steps
    def run_step(self, module: MegatronModule, batch: Mapping[str, Any], forward_only: bool) -> StepResult:
        """Run megatron's forward(-backward) schedule over the microbatches of this rank's batch."""
        assert module.chunks is not None
        seq_length = module.sequence_length(batch)
        # Datamodules without a seq_length were not checked before the first step.
        self.parallel_config.check_sequence_length(seq_length)
        if self.parallel_config.context_parallel_size > 1:
            batch = get_batch_on_this_cp_rank(dict(batch))
        micro_batch_size = self._micro_batch_size or batch_size_of(batch)
        microbatches = split_microbatches(batch, micro_batch_size)
        if not forward_only:
            for chunk in module.chunks:
                chunk.zero_grad_buffer()
            self.optimizers[0].zero_grad()
        result = run_schedule(module.forward_step, module.chunks, microbatches, seq_length, forward_only)
        if not forward_only:
            self._empty_batches.add(result)
        return result

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce a tensor over all ranks (used by ``self.log(..., sync_dist=True)``)."""
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    @override
    def teardown(self) -> None:
        """Leave CPU emulation and drop megatron's CUDA graphs. megatron's process groups stay, like Lightning's
        default group, so that ``trainer.save_checkpoint`` still works after ``fit`` returns; the next run replaces
        them."""
        super().teardown()
        self._cpu.__exit__(None, None, None)
        if self.cuda_graphs:  # megatron keeps its graphs process-wide; a later run records its own
            delete_cuda_graphs()

    @contextlib.contextmanager
    def _megatron_on_device(self) -> Iterator[None]:
        """Re-enter CPU emulation for megatron work after ``fit`` has returned (e.g. a final save)."""
        if self.root_device.type != "cpu" or self._cpu.active:
            yield
            return
        with self._cpu:
            yield

    # ------------------------------------------------------------------ checkpoints (see checkpoint.py)
    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = ckpt.MegatronCheckpointIO(async_save=self.async_save)
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        self._checkpoint_io = io

    def _megatron_io(self) -> ckpt.MegatronCheckpointIO:
        io = self.checkpoint_io
        if not isinstance(io, ckpt.MegatronCheckpointIO):
            raise TypeError(f"the megatron strategy saves sharded checkpoints with MegatronCheckpointIO, got "
                            f"{type(io).__name__}; remove the checkpoint_io plugin")
        return io

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's sharded model state (megatron ``ShardedTensor``s), one entry per model chunk."""
        module = self.lightning_module
        assert isinstance(module, MegatronModule) and module.chunks is not None
        with self._megatron_on_device():
            return module.checkpoint_state_dict()

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """This rank's sharded optimizer state, keyed by the model parameters it belongs to."""
        with self._megatron_on_device():
            return optimizer_sharded_state_dict(optimizer, self.lightning_module_state_dict())

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Every rank writes its shards; the checkpoint directory appears only once all have finished."""
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "megatron's process groups do not exist (another run replaced them, or none ran): save from the "
                "Trainer that trained the model"
            )
        checkpoint["layout"] = self._checkpoint_layout(checkpoint).to_dict()
        with self._megatron_on_device():
            self._megatron_io().save_checkpoint(checkpoint, filepath, storage_options)

    def _checkpoint_layout(self, checkpoint: Mapping[str, Any]) -> ckpt.CheckpointLayout:
        return ckpt.CheckpointLayout(
            global_step=int(checkpoint.get("global_step", 0)),
            epoch=int(checkpoint.get("epoch", 0)),
            parallel=self.parallel_config,
            data_parallel_size=self.data_parallel_size,
            world_size=self.world_size,
            distributed_optimizer=self.ddp.use_distributed_optimizer,
            params_dtype=str(self.precision_plugin.params_dtype).removeprefix("torch."),
            has_optimizer=bool(checkpoint.get("optimizer_states")),
            module=type(self.lightning_module).__qualname__,
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Validate on every rank, then load this rank's shards (resharded to the current layout) into the model
        chunks and megatron's optimizer; returns Lightning's own state (loops, callbacks, schedulers)."""
        io = self._megatron_io()
        io.finalize(blocking=True)
        checkpoint = io.load_checkpoint(checkpoint_path)
        load_optimizer = bool(self.optimizers) and self.ckpt_load_optimizer
        ckpt.check_compatible(checkpoint_path, ckpt.CheckpointLayout.from_dict(checkpoint["layout"]),
                              self._checkpoint_layout(checkpoint), load_optimizer)
        template = self.lightning_module_state_dict()
        if load_optimizer:
            template["optimizer"] = [optimizer_sharded_state_dict(self.optimizers[0], template, is_loading=True)]
        loaded = io.load_sharded(checkpoint_path, template)
        optimizer_states = loaded.pop("optimizer", [None])
        module = self.lightning_module
        assert isinstance(module, MegatronModule)
        module.load_checkpoint_state_dict(loaded)
        if self.optimizers:
            load_optimizer_state(self.optimizers[0], optimizer_states[0])
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Nothing to do: :meth:`load_checkpoint` loaded the weights."""

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Nothing to do: :meth:`load_checkpoint` restored the optimizer."""

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete a checkpoint directory once every rank is past it (called on all ranks)."""
        self.barrier("remove_checkpoint")
        if self.is_global_zero:
            self._megatron_io().remove_checkpoint(filepath)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Publish background checkpoint saves that every rank has finished writing; after the first step and once
        per logging interval, raise if a step had no loss tokens (the only read-back of the step's results)."""
        io = self.checkpoint_io
        if isinstance(io, ckpt.MegatronCheckpointIO):
            io.finalize(blocking=False)
        # Every batch is one optimizer step here, so the step that loggers see is the global step; Lightning's own
        # count comes back one off after resuming from a checkpoint saved at validation.
        trainer = self.lightning_module.trainer
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        if trainer.global_step <= 1 or trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._empty_batches.check()
        super().on_train_batch_start(batch, batch_idx)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="megatron-core parallelism")

