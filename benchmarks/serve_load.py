"""The HTTP server under load on loopback: requests/s, generated tokens/s and latency percentiles.

Serves a random-weight GPT of the GPT-2 124M shape (with the bundled tokenizer's vocabulary) in this process, then
``--clients`` concurrent clients (half of them streaming) each send ``--requests`` completions of ``--max-tokens``
tokens (sampled at temperature 1, end-of-document ignored) with prompts of ``--prompt-tokens`` token ids. The same
load runs with decode steps replayed from CUDA graphs and with the eager decode step, in one process.

GPU:        python benchmarks/serve_load.py --out benchmarks/data/serve_load.jsonl
CPU smoke:  python benchmarks/serve_load.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import threading
import time
from typing import Any

import aiohttp
import torch

from lightning_megatron.data import load_tokenizer
from lightning_megatron.generation import build_engine
from lightning_megatron.generation.session import run_with_model
from lightning_megatron.models.gpt import GPTConfig
from lightning_megatron.serve.server import Server


async def _client(session: aiohttp.ClientSession, url: str, stream: bool, prompts: list[list[int]],
                  max_tokens: int, latencies: list[float], tokens: list[int]) -> None:
    for prompt in prompts:
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
        start = time.perf_counter()
        async with session.post(url, json=body) as reply:
            reply.raise_for_status()
            if stream:
                finished = False
                async for line in reply.content:
                    finished |= line.startswith(b"data: [DONE]")
                if not finished:
                    raise RuntimeError("a streamed completion ended without [DONE]")
                tokens.append(max_tokens)  # end-of-document is ignored, so every completion has max_tokens tokens
            else:
                tokens.append((await reply.json())["usage"]["completion_tokens"])
        latencies.append(time.perf_counter() - start)


async def _load(port: int, clients: int, requests: int, max_tokens: int, prompts: list[list[int]]) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    latencies: list[float] = []
    tokens: list[int] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(
            _client(session, url, i % 2 == 1, [prompts[(i * requests + j) % len(prompts)] for j in range(requests)],
                    max_tokens, latencies, tokens)
            for i in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "tokens_per_s": sum(tokens) / wall, "p50_latency_s": statistics.median(ordered),
            "p95_latency_s": ordered[int(0.95 * (len(ordered) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, light load")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 64; smoke 4)")
    parser.add_argument("--requests", type=int, default=None, help="requests per client (default 8; smoke 2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default 64; smoke 8)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 128; smoke 8)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--out", help="append the results as a JSON line to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    clients = args.clients or (64 if cuda else 4)
    requests = args.requests or (8 if cuda else 2)
    max_tokens = args.max_tokens or (64 if cuda else 8)
    prompt_tokens = args.prompt_tokens or (128 if cuda else 8)
    tokenizer = load_tokenizer(None)
    if args.smoke:
        config = GPTConfig.tiny(vocab_size=tokenizer.vocab_size)
    else:
        config = GPTConfig.gpt2_124m(vocab_size=tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, tokenizer.vocab_size, (256, prompt_tokens), generator=generator).tolist()

    def bench(model: Any, _: Any) -> list[dict[str, Any]]:
        rows = []
        for graphs in ((True, False) if cuda else (None,)):
            engine = build_engine(model, tokenizer, max_batch_size=args.max_batch_size, leader_submits=True,
                                  cuda_graphs=graphs, cache_length=2 * config.seq_length)
            server = Server(engine, tokenizer, port=0, max_queue=4 * clients)
            server.start()
            result: dict[str, Any] = {}

            def drive() -> None:
                # A short warm-up load (graph capture for the batch sizes the load reaches), then the measured one.
                asyncio.run(_load(server.port, clients, 1, max_tokens, prompts))
                result.update(asyncio.run(_load(server.port, clients, requests, max_tokens, prompts)))
                server.shutdown()

            thread = threading.Thread(target=drive)
            thread.start()
            server.serve_forever()
            thread.join()
            label = "CUDA graphs" if graphs else "eager" if graphs is False else "default"
            rows.append({"decode": label, "clients": clients, "streaming_clients": clients // 2,
                         "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
                         "params": sum(p.numel() for p in model.parameters()), **result})
        return rows

    rows = run_with_model(config, bench, accelerator="gpu" if cuda else "cpu",
                          precision="bf16-mixed" if cuda else "32-true")
    if rows is None:
        return
    hardware = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"Server load on {hardware}: {clients} clients ({clients // 2} streaming) x {requests} requests, "
          f"{prompt_tokens} prompt + {max_tokens} new tokens")
    print(f"{'decode':<14}{'requests/s':>12}{'tokens/s':>12}{'p50 s':>9}{'p95 s':>9}")
    for row in rows:
        print(f"{row['decode']:<14}{row['requests_per_s']:>12.1f}{row['tokens_per_s']:>12.1f}"
              f"{row['p50_latency_s']:>9.2f}{row['p95_latency_s']:>9.2f}")
    if args.out:
        with open(args.out, "a") as handle:
            for row in rows:
                handle.write(json.dumps({"benchmark": "serve_load", "hardware": hardware,
                                         "date": time.strftime("%Y-%m-%d"), **row}) + "\n")


if __name__ == "__main__":
    main()
