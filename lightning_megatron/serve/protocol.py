"""The OpenAI-compatible request and response shapes of ``/v1/completions`` and ``/v1/chat/completions``.

Requests are checked field by field; anything wrong raises :class:`RequestError`, which the server answers with
HTTP 400 and OpenAI's error body. Besides OpenAI's fields, requests may set any :class:`SamplingParams` knob under
its own name (``top_k``, ``repetition_penalty``, ``min_tokens``, ``beam_width``, ``stop_token_ids``, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lightning_megatron.generation import GenerationOutput, SamplingParams


class RequestError(ValueError):
    """A request the server cannot run; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


_NUMBER = (int, float)
# OpenAI name -> (SamplingParams field, accepted JSON types)
_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "max_tokens": ("max_new_tokens", (int,)),
    "max_completion_tokens": ("max_new_tokens", (int,)),
    "min_tokens": ("min_new_tokens", (int,)),
    "temperature": ("temperature", _NUMBER),
    "top_p": ("top_p", _NUMBER),
    "top_k": ("top_k", (int,)),
    "top_p_decay": ("top_p_decay", _NUMBER),
    "top_p_min": ("top_p_min", _NUMBER),
    "presence_penalty": ("presence_penalty", _NUMBER),
    "frequency_penalty": ("frequency_penalty", _NUMBER),
    "repetition_penalty": ("repetition_penalty", _NUMBER),
    "seed": ("seed", (int,)),
    "stop_token_ids": ("stop_token_ids", (list,)),
    "ignore_eos": ("ignore_eos", (bool,)),
    "bad_words": ("bad_words", (list,)),
    "beam_width": ("beam_width", (int,)),
    "length_penalty": ("length_penalty", _NUMBER),
}
_IGNORED = {"model", "user", "stream_options", "n", "echo", "logit_bias", "suffix", "best_of"}


@dataclass
class ParsedRequest:
    """What the server runs for one HTTP request."""

    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    chat: bool
    model: str
    logprobs: bool


def _type_name(types: tuple[type, ...]) -> str:
    if float in types:
        return "a number"
    return {int: "an integer", list: "an array", bool: "a boolean"}[types[0]]


def parse_request(body: Any, chat: bool, model: str, default_max_tokens: int = 16) -> ParsedRequest:
    """Validate an OpenAI (chat) completion request body; raise :class:`RequestError` on the first problem."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    allowed = set(_FIELDS) | _IGNORED | {"stream", "stop", "logprobs", "messages" if chat else "prompt"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; supported: {sorted(allowed)}", unknown[0])
    for name, want in (("n", 1), ("best_of", 1)):
        if body.get(name, want) not in (want, None):
            raise RequestError(f"{name} must be 1 (use beam_width for beam search)", name)
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported; use bad_words to block tokens", "logit_bias")
    prompts = [chat_prompt(body.get("messages"))] if chat else _prompts(body.get("prompt"))
    values: dict[str, Any] = {"max_new_tokens": default_max_tokens, "temperature": 1.0}
    for name, (field, types) in _FIELDS.items():
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise RequestError(f"{name} must be {_type_name(types)}, got {type(value).__name__}", name)
        values[field] = value
    for name, kind in (("stop_token_ids", int), ("bad_words", str)):
        items = body.get(name) or []
        if not all(isinstance(item, kind) and not isinstance(item, bool) for item in items) or len(items) > 64:
            raise RequestError(f"{name} must be a list of up to 64 {'integers' if kind is int else 'strings'}", name)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise RequestError("stop must be a non-empty string or a list of up to 16 of them", "stop")
        values["stop"] = tuple(stop)
    elif chat:
        values["stop"] = ("\nUser:",)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, (bool, int)):
        raise RequestError("logprobs must be a boolean or an integer", "logprobs")
    values["logprobs"] = bool(logprobs)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", "stream")
    try:
        params = SamplingParams(**values)
        params.validate()
    except (TypeError, ValueError) as error:
        raise RequestError(str(error)) from None
    if stream and params.beam_width > 1:
        raise RequestError("beam search results cannot be streamed; set stream to false", "stream")
    return ParsedRequest(prompts, params, stream, chat, str(body.get("model") or model), bool(logprobs))


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt) and len(prompt) <= 64:
        return list(prompt)
    raise RequestError("prompt must be a string, a list of up to 64 strings, or a list of token ids", "prompt")


def chat_prompt(messages: Any) -> str:
    """The simple chat template: ``System:``/``User:``/``Assistant:`` turns, ending with ``Assistant:``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{index}] must be an object with a string content", "messages")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{index}].role must be system, user or assistant", "messages")
        turns.append(f"{role.capitalize()}: {message['content']}")
    return "\n".join(turns) + "\nAssistant:"


def _logprobs(output: GenerationOutput, tokenizer: Any) -> dict[str, Any] | None:
    if output.logprobs is None:
        return None
    return {"tokens": [tokenizer.decode([t]) for t in output.tokens], "token_logprobs": output.logprobs}


def response(request: ParsedRequest, request_id: str, outputs: list[GenerationOutput], tokenizer: Any
             ) -> dict[str, Any]:
    """The non-streaming response body."""
    choices = []
    for index, output in enumerate(outputs):
        if request.chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": output.text},
                            "finish_reason": output.finish_reason, "logprobs": _logprobs(output, tokenizer)})
        else:
            choices.append({"index": index, "text": output.text, "finish_reason": output.finish_reason,
                            "logprobs": _logprobs(output, tokenizer)})
    prompt_tokens = sum(len(o.prompt_tokens) for o in outputs)
    completion_tokens = sum(o.length for o in outputs)
    return {"id": request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk(request: ParsedRequest, request_id: str, index: int, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict[str, Any]:
    """One server-sent event of a streaming response."""
    if request.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice]}
