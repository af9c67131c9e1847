"""lm-evaluation-harness on our checkpoints: the ``lightning-megatron`` model of ``lm-eval``, and the
``lightning-megatron lm-eval`` command that registers it.

    lightning-megatron lm-eval --model lightning-megatron \\
        --model_args ckpt=<checkpoint>,config=recipes/gpt-tiny.yaml,tp=2 --tasks lambada_openai --batch_size 16

lm-eval 0.4.13 finds models only in its own source tree (no plugin entry points; ``--include_path`` adds tasks, not
models), so the command imports this module, which registers the model, and then runs lm-eval's command line with
the remaining arguments. From Python: ``import lightning_megatron.harness`` and
``lm_eval.simple_evaluate(model="lightning-megatron", model_args=...)``.

The model loads as ``generate``/``serve`` load it (:func:`~lightning_megatron.generation.session.run_inference`)
under any tensor x pipeline layout: Lightning starts the other ranks (or run the command under ``torchrun``), every
rank runs lm-eval and calls the model together, and rank 0 writes the results. Log-likelihoods come from
:mod:`lightning_megatron.generation.scoring`, the code behind the server's ``echo`` and ``evaluate``.
"""

from __future__ import annotations

import argparse
import atexit
import queue
import sys
import threading
from typing import Any, Callable, Sequence

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("lightning_megatron.harness needs lm-evaluation-harness: pip install lm-eval") from error

from lightning_megatron.generation import Engine, SamplingParams, build_engine
from lightning_megatron.generation.scoring import continuation_loglikelihoods, prefix_token, rolling_loglikelihoods
from lightning_megatron.generation.session import add_model_arguments, run_inference

Job = Callable[[Engine], Any]


class _LoadedModel:
    """A model loaded by :func:`run_inference` that stays loaded: :meth:`call` runs jobs on its engine.

    lm-eval constructs its model and then calls it, while :func:`run_inference` runs its function inside a Trainer
    run and unloads the model when that returns; so the Trainer runs in a background thread whose function serves
    the jobs this thread sends, until :meth:`close` (at exit). Every rank sends the same jobs in the same order.
    """

    def __init__(self, model_argv: Sequence[str], batch_size: int) -> None:
        parser = argparse.ArgumentParser(prog="lightning-megatron model_args")
        add_model_arguments(parser)
        args = parser.parse_args(list(model_argv))
        self.batch_size = batch_size
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._load, args=(args,), name="lightning-megatron", daemon=True)
        self._thread.start()
        ok, value = self._results.get()
        if not ok:
            raise value
        self.engine: Engine = value
        atexit.register(self.close)

    def _load(self, args: argparse.Namespace) -> None:
        try:
            run_inference(args, self._serve)
        except BaseException as error:  # handed to the caller's thread
            self._results.put((False, error))

    def _serve(self, model: Any, tokenizer: Any) -> None:
        self._results.put((True, build_engine(model, tokenizer, max_batch_size=self.batch_size)))
        while (job := self._jobs.get()) is not None:
            try:
                self._results.put((True, job(self.engine)))
            except Exception as error:  # the same on every rank: jobs validate their input before any collective
                self._results.put((False, error))

    def call(self, job: Job) -> Any:
        """Run ``job(engine)`` on the model's thread; returns its value or raises its error."""
        self._jobs.put(job)
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """End the Trainer run (every rank)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


@register_model("lightning-megatron")
class LightningMegatronLM(TemplateLM):
    """A GPT checkpoint as an lm-eval model: ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``
    on our engine, batched ``batch_size`` sequences at a time, under any tensor x pipeline layout."""

    def __init__(self, ckpt: str | None = None, config: str | None = None, tokenizer: str | None = None,
                 tp: int = 1, pp: int = 1, accelerator: str = "auto", precision: str = "32-true",
                 max_gen_toks: int = 256, batch_size: int | str = 16, max_batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__()
        # lm-eval passes its --device, "cuda:0" unless told otherwise: the accelerator comes from model_args.
        del device
        size = int(batch_size) if str(batch_size).isdigit() else (max_batch_size or 16)  # "auto": our default
        argv = ["--devices", str(tp * pp), "--tp", str(tp), "--pp", str(pp), "--accelerator", accelerator,
                "--precision", str(precision)]
        for flag, value in (("--ckpt", ckpt), ("--config", config), ("--tokenizer", tokenizer)):
            if value is not None:
                argv += [flag, str(value)]
        self._model = _LoadedModel(argv, size)
        self.tokenizer = self._model.engine.tokenizer
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        """The end-of-document token."""
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a document's first token are conditioned on (BOS, else end-of-document)."""
        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        """The model's sequence length."""
        return self._model.engine.max_sequence_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (no special tokens added)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        """Text of ``tokens``."""
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = self._model.call(lambda engine: continuation_loglikelihoods(engine, pairs))
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log probability of each whole text, in windows of the model's sequence length."""
        documents = [self.tok_encode(request.args[0]) for request in requests]
        prefix = self.prefix_token_id
        results = self._model.call(lambda engine: rolling_loglikelihoods(engine, documents, prefix))
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut before the first ``until`` string."""
        prompts, params = [], []
        for context, gen_kwargs in (request.args for request in requests):
            settings = self.sampling_params(gen_kwargs)
            room = self.max_length - settings.max_new_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks {settings.max_new_tokens} leaves no room for a context in the "
                                 f"model's {self.max_length} tokens")
            prompts.append(self.tok_encode(context)[-room:] or [self.prefix_token_id])
            params.append(settings)
        outputs = self._model.call(lambda engine: engine.generate(prompts, params))
        texts = [output.text for output in outputs]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def sampling_params(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        """:class:`SamplingParams` of an lm-eval generation request (``until``, ``max_gen_toks``, ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``)."""
        settings = dict(gen_kwargs)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        sample = settings.pop("do_sample", False)
        temperature = float(settings.pop("temperature", 1.0 if sample else 0.0))
        params = SamplingParams(max_new_tokens=int(settings.pop("max_gen_toks", self.max_gen_toks)),
                                temperature=temperature if sample else 0.0, top_p=float(settings.pop("top_p", 1.0)),
                                top_k=int(settings.pop("top_k", 0) or 0), stop=tuple(s for s in until if s))
        if settings:
            raise ValueError(f"generation setting(s) {sorted(settings)} are not supported by lightning-megatron; "
                             f"supported: until, max_gen_toks, do_sample, temperature, top_p, top_k")
        params.validate()
        return params


def main(argv: Sequence[str]) -> int:
    """Entry point of ``lightning-megatron lm-eval``: lm-eval's command line, with this model registered."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    command = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        args = cli.parse_args()
    finally:
        sys.argv = command  # Lightning starts the other ranks by running this same command again
    cli.execute(args)
    return 0
