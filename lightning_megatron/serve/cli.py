"""``lightning-megatron serve``: an OpenAI-compatible server for a trained GPT on 127.0.0.1.

    lightning-megatron serve --ckpt runs/gpt-tiny/.../last.ckpt --port 8000
    lightning-megatron serve --ckpt ... --devices 4 --tp 2 --port 8000     (two TP=2 replicas share the requests)
    curl -N localhost:8000/v1/completions -d '{"prompt": "In the beginning", "max_tokens": 32, "stream": true}'
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any, Sequence

from lightning_megatron.generation import build_engine
from lightning_megatron.generation.replicas import replica
from lightning_megatron.generation.session import add_model_arguments, check_layout, run_inference
from lightning_megatron.serve.server import LOOPBACK, Server


class _DisconnectsInOneLine(logging.Filter):
    """A client that goes away mid-stream is routine for a server: one line, not aiohttp's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ConnectionResetError):
            record.msg, record.args = f"{record.getMessage()}: the client disconnected ({error})", ()
            record.exc_info = record.exc_text = None
        return True


def main(argv: Sequence[str]) -> int:
    """Entry point of ``lightning-megatron serve``; runs until interrupted (Ctrl-C / SIGTERM)."""
    parser = argparse.ArgumentParser(prog="lightning-megatron serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", choices=LOOPBACK)
    group.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    group.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    group.add_argument("--cache-length", type=int, default=None,
                       help="key/value cache positions (default 2 x the model's sequence length)")
    group.add_argument("--model-name", default="lightning-megatron")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step into one fused graph (--tp 1 --pp 1; the first tokens "
                       "wait for compilation)")
    group.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a request omits it")
    args = parser.parse_args(list(argv))
    logging.getLogger("aiohttp.server").addFilter(_DisconnectsInOneLine())
    check_layout(parser, args)  # --devices / (tp x pp) replicas of the model share the requests

    def serve(model: Any, tokenizer: Any) -> None:
        engine = build_engine(model, tokenizer, max_batch_size=args.max_batch_size, leader_submits=True,
                              cache_length=args.cache_length or 2 * model.config.seq_length, replica=replica()[0],
                              compile=args.compile)
        server = Server(engine, tokenizer, host=args.host, port=args.port, model_name=args.model_name,
                        default_max_tokens=args.default_max_tokens)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.shutdown())
        server.start()
        if server.leader:
            print(f"Serving {args.model_name} on http://{args.host}:{server.port}", flush=True)
        server.serve_forever()

    run_inference(args, serve)
    return 0
