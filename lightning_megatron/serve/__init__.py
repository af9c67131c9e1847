"""Serving: an OpenAI-compatible HTTP server (completions, chat, SSE streaming) over the generation engine."""

from lightning_megatron.serve.server import Metrics, Server

__all__ = ["Metrics", "Server"]
