"""Train the tiny GPT briefly under a layout, then generate with it: what a user of generation would compare.

Run under torchrun (or plain python for one process). Writes JSON to --out on global rank 0 with the greedy tokens
of a mixed-length batch decoded with the KV cache and by recomputation, seeded samples (alone and batched), beam
results, prompt log probabilities with their top tokens, and the SampleText callback's text; --save-ckpt also saves
the model for the CLI tools. ``--then`` starts another run's arguments (see fresh_runs.py).
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch

import lightning_megatron as lm
from fresh_runs import layout_arguments, run_each
from lightning_megatron.callbacks import SampleText
from lightning_megatron.data import TextDataModule
from lightning_megatron.generation import SamplingParams, build_engine, generate
from lightning_megatron.generation.predict import CompletionsWriter, PromptsDataModule

PROMPTS = ["In the beginning God", "And the LORD said unto Moses,", "Blessed"]


class Probe(L.Callback):
    """After training, run each generation mode on every rank and keep rank 0's results."""

    def __init__(self) -> None:
        self.results: dict = {}

    def on_train_end(self, trainer, pl_module):
        tokenizer = trainer.datamodule.tokenizer
        greedy = SamplingParams(max_new_tokens=12)
        cached = generate(pl_module, PROMPTS, greedy, tokenizer=tokenizer)
        recomputed = generate(pl_module, PROMPTS, greedy, tokenizer=tokenizer, use_cache=False)
        sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
        alone = generate(pl_module, PROMPTS[1], sampled, tokenizer=tokenizer)
        together = generate(pl_module, PROMPTS, [greedy, sampled, greedy.replace(temperature=0.8, seed=3)],
                            tokenizer=tokenizer)
        beam1 = generate(pl_module, PROMPTS, SamplingParams(max_new_tokens=12, beam_width=1), tokenizer=tokenizer)
        beam3 = generate(pl_module, PROMPTS[0], SamplingParams(max_new_tokens=8, beam_width=3), tokenizer=tokenizer)
        beam3_recomputed = generate(pl_module, PROMPTS[0], SamplingParams(max_new_tokens=8, beam_width=3),
                                    tokenizer=tokenizer, use_cache=False)
        engine = build_engine(pl_module, tokenizer, max_batch_size=4)
        turns = []
        with engine.runner.inference_mode():
            for text in (PROMPTS[0], " and the earth"):
                request = engine.submit(text, greedy, session_id="chat")
                while request not in engine.finished:
                    engine.step()
                turns.append(engine.finished.pop(request))
        whole = generate(pl_module, turns[1].prompt_tokens, greedy, tokenizer=tokenizer)
        scoring = SamplingParams(max_new_tokens=4, logprobs=True, top_logprobs=2, prompt_logprobs=2)
        scored = generate(pl_module, PROMPTS, scoring, tokenizer=tokenizer)
        scored_recomputed = generate(pl_module, PROMPTS, scoring, tokenizer=tokenizer, use_cache=False)
        self.results = {
            "session": turns[1].tokens,
            "session_whole": whole[0].tokens,
            "session_cached": turns[1].cached_tokens,
            "scored": [o.tokens for o in scored],
            "prompt_logprobs": [o.prompt_logprobs[1:] for o in scored],
            "prompt_logprobs_recomputed": [o.prompt_logprobs[1:] for o in scored_recomputed],
            "prompt_top": [[list(top) for top in o.prompt_top_logprobs[1:]] for o in scored],
            "generated_top": [[list(top) for top in o.top_logprobs] for o in scored],
            "cached": [o.tokens for o in cached],
            "recomputed": [o.tokens for o in recomputed],
            "cached_text": [o.text for o in cached],
            "sampled_alone": alone[0].tokens,
            "sampled_together": together[1].tokens,
            "beam1": [o.tokens for o in beam1],
            "beam3": beam3[0].tokens,
            "beam3_recomputed": beam3_recomputed[0].tokens,
            "beam3_logprob": beam3[0].cumulative_logprob,
        }


def arguments() -> argparse.ArgumentParser:
    """The options of one run."""
    parser = layout_arguments()
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--init-std", type=float, default=0.2)
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "llama", "alibi"])
    parser.add_argument("--save-ckpt", help="also save the trained model as a Lightning checkpoint here")
    parser.add_argument("--predict-out", help="then run trainer.predict over PROMPTS, writing completions here")
    return parser


def train_and_generate(args: argparse.Namespace) -> None:
    """One run: train, generate in every mode, write the results to ``args.out``."""

    torch.set_num_threads(1)
    data = TextDataModule(seq_length=64, global_batch_size=8, micro_batch_size=2)
    shape = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64)
    if args.arch == "llama":
        config = lm.GPTConfig.llama(vocab_size=4096, num_query_groups=2, init_method_std=args.init_std, **shape)
    elif args.arch == "alibi":
        # 6 heads: ALiBi's slopes for a head count that is not a power of two, 3 per TP rank. Wider weights: after
        # the embedding norm, the default ones give one repeated token.
        config = lm.GPTConfig.bloom(vocab_size=4096, init_method_std=max(args.init_std, 0.5),
                                    **{**shape, "hidden_size": 96, "num_attention_heads": 6})
    else:
        config = lm.GPTConfig(vocab_size=4096, init_method_std=args.init_std, **shape)
    model = lm.GPT(config, lm.OptimConfig(lr=3e-3, warmup_steps=1, decay_steps=args.steps))
    strategy = lm.MegatronStrategy(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                   virtual_pipeline_model_parallel_size=args.vp, context_parallel_size=args.cp,
                                   sequence_parallel=args.sp)
    probe = Probe()
    sample = SampleText(max_new_tokens=16)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=args.devices, max_steps=args.steps,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, logger=False, callbacks=[probe, sample])
    trainer.fit(model, datamodule=data)
    if args.save_ckpt:
        trainer.save_checkpoint(args.save_ckpt)
    if args.predict_out:
        prompts = Path(args.out).with_suffix(".prompts.jsonl")
        if trainer.is_global_zero:
            prompts.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": 12}) + "\n" for p in PROMPTS))
        trainer.strategy.barrier()
        predictor = L.Trainer(strategy=lm.MegatronStrategy(tensor_model_parallel_size=args.tp,
                                                           pipeline_model_parallel_size=args.pp,
                                                           virtual_pipeline_model_parallel_size=args.vp),
                              accelerator="cpu", devices=args.devices, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, callbacks=[CompletionsWriter(args.predict_out)])
        predictor.predict(lm.GPT(config), datamodule=PromptsDataModule(str(prompts), batch_size=2),
                          return_predictions=False)
    if trainer.is_global_zero:
        with open(args.out, "w") as handle:
            json.dump({**probe.results, "sample": sample.samples[-1][1]}, handle)


def main() -> None:
    run_each(arguments(), train_and_generate, sys.argv[1:])


if __name__ == "__main__":
    main()
