"""An OpenAI-compatible HTTP server over the generation engine, with continuous batching and SSE streaming.

Global rank 0 answers HTTP (aiohttp, in a background thread, loopback only) and queues requests into the
:class:`~lightning_megatron.generation.Engine`; every rank runs :meth:`Server.serve_forever`, the engine loop, in
its main thread, so requests arriving while others decode join the running batch at the next step.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` for server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text: requests, tokens/s, queue depth), and vLLM's
tokenizer endpoints ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize`` (which lm-evaluation-harness's
``local-completions`` uses instead of downloading a tokenizer).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from typing import Any

import torch.distributed as dist
from aiohttp import web

from lightning_megatron.generation import Engine, GenerationOutput, TokenEvent
from lightning_megatron.serve.protocol import (
    ParsedRequest,
    RequestError,
    Scored,
    chunk,
    client_error,
    echo_text,
    parse_request,
    response,
    token_text,
    usage_chunk,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY_BYTES = 1 << 20
log = logging.getLogger(__name__)


class Metrics:
    """Counters the engine thread updates and ``/metrics`` reports."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.requests_total = 0
        self.requests_failed = 0
        self.tokens_total = 0
        self.batch_size = 0
        self.peak_batch_size = 0
        self.window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def record_tokens(self, count: int) -> None:
        """Count tokens produced by one engine step."""
        now = time.monotonic()
        self.tokens_total += count
        self._recent.append((now, count))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def record_batch(self, size: int) -> None:
        """Note how many sequences the engine is decoding together."""
        self.batch_size = size
        self.peak_batch_size = max(self.peak_batch_size, size)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.monotonic()
        return sum(c for t, c in self._recent if t >= now - self.window_s) / self.window_s


class Server:
    """Serves one model replica (all ranks of it); only global rank 0 listens on ``host:port``."""

    def __init__(self, engine: Engine, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "lightning-megatron", max_queue: int = 256, default_max_tokens: int = 16) -> None:
        if host not in LOOPBACK:
            raise ValueError(f"the server listens on loopback only ({', '.join(LOOPBACK)}), not {host!r}; "
                             f"put a reverse proxy in front of it to expose it")
        if dist.is_initialized() and dist.get_world_size() > 1 and not engine.leader_submits:
            raise ValueError("with several ranks the server's engine must be built with leader_submits=True "
                             "(rank 0 receives the requests and broadcasts them)")
        self.engine = engine
        self.tokenizer = tokenizer
        self.host = host
        self.port = port
        self.model_name = model_name
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics()
        self.leader = not dist.is_initialized() or dist.get_rank() == 0
        self._lock = threading.Lock()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._http_thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None

    # ------------------------------------------------------------------ engine side (every rank)
    def serve_forever(self) -> None:
        """Run the engine loop until :meth:`shutdown` (called on rank 0 from any thread)."""
        self.start()
        try:
            with self.engine.runner.inference_mode():
                while not self.engine.closed:
                    if self.leader:
                        self.engine.wait(timeout=1.0)
                    events = self.engine.step()
                    if self.leader:
                        self.metrics.record_batch(sum(r.width for r in self.engine.active))
                        self._dispatch(events)
        finally:
            if self.leader:
                self._stop_http()

    def shutdown(self) -> None:
        """Stop serving on every rank (the engine broadcasts the request at its next step)."""
        self.engine.close()

    def _dispatch(self, events: list[TokenEvent]) -> None:
        self.metrics.record_tokens(sum(1 for e in events if e.token is not None))
        for event in events:
            with self._lock:
                listener = self._listeners.get(event.request_id)
                if event.finished:
                    self._listeners.pop(event.request_id, None)
            output = self.engine.finished.pop(event.request_id, None) if event.finished else None
            if listener is not None:
                loop, events_queue = listener
                loop.call_soon_threadsafe(events_queue.put_nowait, (event, output))

    # ------------------------------------------------------------------ HTTP side (rank 0)
    def start(self) -> None:
        """Start listening (rank 0; other ranks have nothing to start); :attr:`port` is then the bound port."""
        if not self.leader or self._http_thread is not None:
            return
        self._http_thread = threading.Thread(target=self._run_http, name="http", daemon=True)
        self._http_thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
        if self._startup_error is not None:
            raise self._startup_error

    def _run_http(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/metrics", self._metrics),
            web.get("/tokenizer_info", self._tokenizer_info),
            web.post("/tokenize", self._tokenize),
            web.post("/detokenize", self._detokenize),
            web.delete("/v1/sessions/{session_id}", self._end_session),
        ])
        app.middlewares.append(_json_errors)
        # A client that goes away cancels its handler, and so its generation (streamed or not).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as error:  # reported to the engine thread, which raises it
            self._startup_error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def _stop_http(self) -> None:
        if self._loop is not None and self._http_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._http_thread.join(timeout=10)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                              "owned_by": "lightning-megatron"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        m = self.metrics
        lines = [
            "# TYPE lightning_megatron_requests_total counter",
            f"lightning_megatron_requests_total {m.requests_total}",
            "# TYPE lightning_megatron_requests_failed_total counter",
            f"lightning_megatron_requests_failed_total {m.requests_failed}",
            "# TYPE lightning_megatron_generated_tokens_total counter",
            f"lightning_megatron_generated_tokens_total {m.tokens_total}",
            "# TYPE lightning_megatron_tokens_per_second gauge",
            f"lightning_megatron_tokens_per_second {m.tokens_per_second():.3f}",
            "# TYPE lightning_megatron_running_requests gauge",
            f"lightning_megatron_running_requests {len(self._listeners)}",
            "# TYPE lightning_megatron_batch_size gauge",
            f"lightning_megatron_batch_size {m.batch_size}",
            "# TYPE lightning_megatron_peak_batch_size gauge",
            f"lightning_megatron_peak_batch_size {m.peak_batch_size}",
            "# TYPE lightning_megatron_queue_depth gauge",
            f"lightning_megatron_queue_depth {self.engine.queue_depth}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _tokenizer_info(self, request: web.Request) -> web.Response:
        tokenizer = self.tokenizer
        special = {name: None if token is None else token_text(tokenizer, token) for name, token in (
            ("bos_token", getattr(tokenizer, "bos", None)), ("eos_token", tokenizer.eod),
            ("pad_token", getattr(tokenizer, "pad", None)))}
        return web.json_response({**special, "model_max_length": self.engine.max_sequence_length,
                                  "chat_template": None})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string", "prompt")
        add_bos = body.get("add_special_tokens", False)
        if not isinstance(add_bos, bool):
            raise RequestError("add_special_tokens must be a boolean", "add_special_tokens")
        bos = getattr(self.tokenizer, "bos", None)
        tokens = ([bos] if add_bos and bos is not None else []) + self.tokenizer.encode(prompt)
        return web.json_response({"tokens": tokens, "count": len(tokens),
                                  "max_model_len": self.engine.max_sequence_length})

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestError("tokens must be a list of token ids", "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    async def _end_session(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        if session_id not in self.engine.sessions:
            raise RequestError(f"no session {session_id!r} (it ended or expired)", "session_id", status=404)
        self.engine.end_session(session_id)
        return web.json_response({"id": session_id, "object": "session", "deleted": True})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, http: web.Request, chat: bool) -> web.StreamResponse:
        self.metrics.requests_total += 1
        try:
            body = await _json_body(http)
            parsed = parse_request(body, chat, self.model_name, self.default_max_tokens,
                                   bos=getattr(self.tokenizer, "bos", None))
            if self.engine.queue_depth + len(parsed.prompts) > self.max_queue:
                raise RequestError(f"the server is busy ({self.engine.queue_depth} requests queued); retry later",
                                   status=503)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            ids = []
            with self._lock:
                try:
                    for prompt in parsed.engine_prompts(self.tokenizer, self.engine.sessions):
                        ids.append(self.engine.submit(prompt, parsed.params, session_id=parsed.session_id))
                        self._listeners[ids[-1]] = (loop, queue)
                except ValueError as error:
                    for request_id in ids:
                        self._listeners.pop(request_id, None)
                        self.engine.cancel(request_id)
                    raise client_error(error, body) from None
        except RequestError:
            self.metrics.requests_failed += 1
            raise
        name = f"{'chatcmpl' if chat else 'cmpl'}-{ids[0]}"
        try:
            if parsed.stream:
                return await self._stream(http, parsed, name, ids, queue)
            outputs = await self._collect(ids, queue)
            return web.json_response(response(parsed, name, outputs, self.tokenizer))
        except (asyncio.CancelledError, ConnectionResetError):
            self._abandon(name, ids)
            raise

    async def _collect(self, ids: list[int], queue: asyncio.Queue) -> list[GenerationOutput]:
        outputs: dict[int, GenerationOutput] = {}
        while len(outputs) < len(ids):
            event, output = await queue.get()
            if output is not None:
                outputs[event.request_id] = output
        return [outputs[i] for i in ids]

    async def _stream(self, http: web.Request, parsed: ParsedRequest, name: str, ids: list[int],
                      queue: asyncio.Queue) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await reply.prepare(http)
            await self._send_events(reply, parsed, name, ids, queue)
        except ConnectionResetError:  # a write found the client gone: one line in the log, not aiohttp's tracebacks
            self._abandon(name, ids)
        return reply

    def _abandon(self, name: str, ids: list[int]) -> None:
        for request_id in ids:
            self.engine.cancel(request_id)
        if not self.engine.closed:
            log.warning("%s: the client disconnected; its generation was cancelled", name)

    async def _send_events(self, reply: web.StreamResponse, parsed: ParsedRequest, name: str, ids: list[int],
                           queue: asyncio.Queue) -> None:
        index = {request_id: i for i, request_id in enumerate(ids)}
        if parsed.chat:
            for request_id in ids:
                await _send(reply, chunk(parsed, name, index[request_id], None, None, first=True))
        if parsed.echo:
            for request_id in ids:
                i = index[request_id]
                await _send(reply, chunk(parsed, name, i, echo_text(parsed.prompts[i], self.tokenizer), None))
        outputs = []
        while len(outputs) < len(ids):
            event, output = await queue.get()
            i = index[event.request_id]
            scored = None
            if parsed.top_logprobs is not None and event.token is not None:
                scored = Scored([event.token], [event.logprob], [event.top_logprobs or {}])
            if event.text or scored is not None:
                await _send(reply, chunk(parsed, name, i, event.text, None, scored=scored, tokenizer=self.tokenizer))
            if event.finished:
                outputs.append(output)
                await _send(reply, chunk(parsed, name, i, None, event.finish_reason))
        if parsed.include_usage:
            await _send(reply, usage_chunk(parsed, name, outputs))
        await reply.write(b"data: [DONE]\n\n")
        await reply.write_eof()


async def _json_body(http: web.Request) -> Any:
    try:
        return await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("the request body is not valid JSON") from None


async def _send(reply: web.StreamResponse, payload: dict[str, Any]) -> None:
    await reply.write(f"data: {json.dumps(payload)}\n\n".encode())


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error is a JSON body with a 4xx/5xx status; a bad request never reaches the engine loop."""
    try:
        return await handler(request)
    except RequestError as error:
        return web.json_response(error.body(), status=error.status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = {404: "no such endpoint", 405: "method not allowed", 413: "request body too large"}.get(
            error.status, error.reason)
        return web.json_response(RequestError(message, status=error.status).body(), status=error.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as error:  # a bug must cost one request a 500, never the server
        body = {"error": {"message": f"internal error: {error}", "type": "server_error", "param": None, "code": None}}
        return web.json_response(body, status=500)
