"""Train the tiny GPT under a given layout and write what a user would compare: the loss of every step.

Run under torchrun (or plain python for one process). Writes JSON to --out on global rank 0:
{"losses": [...], "steps": [...], "batches": [...], "val_loss": float, "world_size": int}
(``steps`` are the global steps the losses belong to, ``batches`` a checksum of rank 0's tokens at each step), and
with --save-dir "saved": {checkpoint name: its global step} of what the directory holds when the run ends.

``--then`` starts another run's arguments: the runs go one after another in the same processes, each as if alone
(see fresh_runs.py).

Checkpoint flags: --save-dir with --every-n saves sharded checkpoints (ModelCheckpoint, save_last), --resume
continues from a path or "last", --validate-only evaluates a checkpoint, --kill-at-save STEP SIGKILLs every rank
after the shards of that step's first checkpoint are written and before it is published.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_megatron as lm
from fresh_runs import layout_arguments, run_each
from lightning_megatron import checkpoint
from lightning_megatron.data import TextDataModule
from lightning_megatron.data.gpt_dataset import MegatronGPTDataModule
from lightning_megatron.optim import torch_optimizers
from lightning_megatron.data import MaskedLMDataModule, SpanCorruptionDataModule
from lightning_megatron.models.bert import Bert, BertConfig
from lightning_megatron.models.lora import LoRAConfig
from lightning_megatron.models.t5 import T5, T5Config
from lightning_megatron.parallel import DDPConfig, RecomputeConfig

class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.batches: list[int] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])  # the step's (logged on logging steps only)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))
        self.steps.append(trainer.global_step)
        ids = next(value for value in batch.values() if torch.is_tensor(value)).long()  # tokens, or BERT/T5's text
        self.batches.append(int((ids * torch.arange(ids.numel()).view_as(ids)).sum()))


class RecordSamples(L.Callback):
    """Writes the samples each rank trained on (their token ids) to <dir>/rank<N>.json."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.steps: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(batch["tokens"].tolist())

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(self.steps, handle)


class SaveAtEnd(L.Callback):
    """Trainer.save_checkpoint / export when training or validation ends, while megatron's groups still exist;
    import consolidated weights before validating."""

    def __init__(self, path: str | None, export: str | None, import_path: str | None) -> None:
        self.path = path
        self.export = export
        self.import_path = import_path

    def on_validation_start(self, trainer, pl_module):
        if self.import_path:
            from lightning_megatron.convert.consolidated import import_consolidated

            import_consolidated(pl_module, self.import_path)

    def _save(self, trainer, pl_module) -> None:
        if self.path:
            trainer.save_checkpoint(self.path)
        if self.export:
            from lightning_megatron.convert.consolidated import export_consolidated

            export_consolidated(pl_module, self.export)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.training and trainer.state.fn == "validate":
            self._save(trainer, pl_module)


def kill_when_publishing(step: int) -> None:
    """Die like a preempted node: after the shards of ``step`` are on disk, before the checkpoint is published.

    The helper processes (dist_checkpointing's writer queue manager) die too, as they would with the node."""
    publish = checkpoint._publish

    def publish_or_die(partial, path, layout, trainer_state):
        if layout["global_step"] == step:
            for child in psutil.Process().children(recursive=True):
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        publish(partial, path, layout, trainer_state)

    checkpoint._publish = publish_or_die


def arguments() -> argparse.ArgumentParser:
    """The options of one run."""
    parser = layout_arguments()
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--recompute", default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rampup", type=int, nargs=3, default=None, help="start increment samples")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "llama", "bert", "t5"])
    parser.add_argument("--data-prefix", default=None, help="an indexed dataset (else the bundled corpus)")
    parser.add_argument("--record-samples", default=None, help="a directory for each rank's trained samples")
    parser.add_argument("--decay-steps", type=int, default=None)
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--every-n", type=int, default=None)
    parser.add_argument("--save-end", default=None, help="Trainer.save_checkpoint to this path at the end")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--fresh-optimizer", action="store_true")
    parser.add_argument("--fused-adam", action="store_true", help="OptimConfig(fused=True): torch's fused AdamW")
    parser.add_argument("--validate-only", action="store_true")
    parser.add_argument("--kill-at-save", type=int, default=None)
    parser.add_argument("--export", default=None, help="write the final weights to this safetensors file")
    parser.add_argument("--import", dest="import_path", default=None, help="validate these safetensors weights")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (rank 4, alpha 8) on every target")
    parser.add_argument("--adapters-only", action="store_true", help="LoRA checkpoints hold only the adapters")
    parser.add_argument("--init-from", default=None, help="start from this checkpoint's weights")
    return parser


def train(args: argparse.Namespace) -> None:
    """One run: train (or validate) as the options say and write its results to ``args.out``."""
    if args.kill_at_save is not None:
        kill_when_publishing(args.kill_at_save)

    torch.set_num_threads(1)
    if args.data_prefix:
        data = MegatronGPTDataModule(args.data_prefix, split="98,2,0", seq_length=args.seq,
                                     global_batch_size=args.global_batch, micro_batch_size=args.micro_batch)
    else:
        data = TextDataModule(seq_length=args.seq, global_batch_size=args.global_batch,
                              micro_batch_size=args.micro_batch, rampup_batch_size=args.rampup)
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, seq_length=args.seq)
    optim = lm.OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=args.decay_steps or args.steps, fused=args.fused_adam)
    if args.arch == "bert":
        data = MaskedLMDataModule(seq_length=args.seq, global_batch_size=args.global_batch,
                                  micro_batch_size=args.micro_batch, sentence_order=True)
        # 4352 = 17 x 256: the same padded vocabulary (whose rows join the softmax) under TP=1 and TP=2.
        model = Bert(BertConfig(vocab_size=4352, binary_head=True, hidden_dropout=0.0, attention_dropout=0.0,
                                **shape), optim)
    elif args.arch == "t5":
        data = SpanCorruptionDataModule(seq_length=args.seq, decoder_seq_length=args.seq // 2,
                                        global_batch_size=args.global_batch, micro_batch_size=args.micro_batch)
        model = T5(T5Config(vocab_size=4352, num_layers=args.layers, hidden_size=args.hidden,
                            num_attention_heads=args.heads, ffn_hidden_size=2 * args.hidden,
                            encoder_seq_length=args.seq,
                            decoder_seq_length=args.seq // 2, hidden_dropout=0.0, attention_dropout=0.0), optim)
    else:
        config = (lm.GPTConfig.llama(vocab_size=4096, num_query_groups=args.heads // 2, **shape)
                  if args.arch == "llama" else lm.GPTConfig(vocab_size=4096, **shape))
        lora = LoRAConfig(rank=4, alpha=8.0, adapters_only=args.adapters_only) if args.lora else None
        model = lm.GPT(config, optim, lora=lora, init_from=args.init_from)
    strategy = lm.MegatronStrategy(
        parallel_config=lm.ParallelConfig(
            tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
            virtual_pipeline_model_parallel_size=args.vp, context_parallel_size=args.cp, sequence_parallel=args.sp,
        ),
        recompute=RecomputeConfig(args.recompute, "uniform" if args.recompute == "full" else None,
                                  1 if args.recompute == "full" else None),
        ddp=DDPConfig(use_distributed_optimizer=args.dist_opt),
        compile_layers=args.compile,
        async_save=args.async_save,
        ckpt_load_optimizer=not args.fresh_optimizer,
    )
    record = RecordLosses()
    callbacks = [record, SaveAtEnd(args.save_end, args.export, args.import_path)]
    if args.record_samples:
        callbacks.append(RecordSamples(args.record_samples))
    if args.save_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.save_dir, filename="{step}", every_n_train_steps=args.every_n,
                                         save_top_k=-1, save_last=True))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        # Lightning turns precision="16-mixed" into bf16 on the CPU; the plugin keeps fp16 and its loss scaler.
        plugins=[lm.MegatronPrecision(args.precision, initial_loss_scale=2.0**10)],
        max_steps=args.steps,
        limit_val_batches=2,
        val_check_interval=args.steps,
        enable_checkpointing=bool(args.save_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
    )
    if args.validate_only:
        trainer.validate(model, datamodule=data, ckpt_path=args.resume)
    else:
        trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        results = {"losses": record.losses, "steps": record.steps, "batches": record.batches, "lrs": record.lrs,
                   "val_loss": float(metrics["val_loss"]), "skipped_steps": float(metrics.get("skipped_steps", 0.0)),
                   "world_size": trainer.world_size,
                   "adam_fused": [group.get("fused", False) for optimizer in trainer.optimizers
                                  for inner in torch_optimizers(optimizer) for group in inner.param_groups]}
        if args.save_dir:  # what a later run in the same directory will change
            results["saved"] = {path.name: checkpoint.read_layout(path).global_step
                                for path in sorted(Path(args.save_dir).iterdir())}
        with open(args.out, "w") as handle:
            json.dump(results, handle)


def main() -> None:
    run_each(arguments(), train, sys.argv[1:])


if __name__ == "__main__":
    main()
