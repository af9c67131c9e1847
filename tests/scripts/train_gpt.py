"""Train the tiny GPT under a given layout and write what a user would compare: the loss of every step.

Run under torchrun (or plain python for one process). Writes JSON to --out on global rank 0:
{"losses": [...], "val_loss": float, "world_size": int}.
"""

import argparse
import json

import lightning as L
import torch

import lightning_megatron as lm
from lightning_megatron.data import TextDataModule
from lightning_megatron.data.gpt_dataset import MegatronGPTDataModule
from lightning_megatron.models.bert import Bert, BertConfig, MaskedLMDataModule
from lightning_megatron.models.t5 import T5, SpanCorruptionDataModule, T5Config


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--recompute", default=None)
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
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.data_prefix:
        data = MegatronGPTDataModule(args.data_prefix, split="98,2,0", seq_length=args.seq,
                                     global_batch_size=args.global_batch, micro_batch_size=args.micro_batch)
    else:
        data = TextDataModule(seq_length=args.seq, global_batch_size=args.global_batch,
                              micro_batch_size=args.micro_batch, rampup_batch_size=args.rampup)
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, seq_length=args.seq)
    optim = lm.OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=args.steps)
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
    elif args.arch == "llama":
        model = lm.GPT(lm.GPTConfig.llama(vocab_size=4096, num_query_groups=args.heads // 2, **shape), optim)
    else:
        model = lm.GPT(lm.GPTConfig(vocab_size=4096, **shape), optim)
    strategy = lm.MegatronStrategy(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vp,
        context_parallel_size=args.cp,
        sequence_parallel=args.sp,
        use_distributed_optimizer=args.dist_opt,
        recompute_granularity=args.recompute,
        recompute_method="uniform" if args.recompute == "full" else None,
        recompute_num_layers=1 if args.recompute == "full" else None,
    )
    record = RecordLosses()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        # Lightning turns precision="16-mixed" into bf16 on the CPU; the plugin keeps fp16 and its loss scaler.
        plugins=[lm.MegatronPrecision(args.precision, initial_loss_scale=2.0**10)],
        max_steps=args.steps,
        limit_val_batches=2,
        val_check_interval=args.steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[record] + ([RecordSamples(args.record_samples)] if args.record_samples else []),
    )
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        with open(args.out, "w") as handle:
            metrics = trainer.callback_metrics
            json.dump({"losses": record.losses, "val_loss": float(metrics["val_loss"]),
                       "skipped_steps": float(metrics.get("skipped_steps", 0.0)),
                       "world_size": trainer.world_size}, handle)


if __name__ == "__main__":
    main()
