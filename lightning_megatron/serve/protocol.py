"""The OpenAI-compatible request and response shapes of ``/v1/completions`` and ``/v1/chat/completions``.

Requests are checked field by field; anything wrong raises :class:`RequestError`, which the server answers with
HTTP 400 (404 ``model_not_found`` for another model's name) and OpenAI's error body, naming the request's own
fields. Besides OpenAI's fields, requests may set any :class:`SamplingParams` knob under its own name (``top_k``,
``repetition_penalty``, ``min_tokens``, ``beam_width``, ``stop_token_ids``, ``top_p_reset_ids``, ...) and
``add_bos``. Log probabilities follow OpenAI: completions take ``logprobs: N`` (and ``echo`` to score the prompt,
``max_tokens: 0`` to only score it) and answer ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``;
chat takes ``logprobs: true, top_logprobs: N`` and answers ``content`` entries.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Container

from lightning_megatron.generation import GenerationOutput, SamplingParams


class RequestError(ValueError):
    """A request the server cannot run; ``param`` names the offending field, ``code`` is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


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
    "top_p_reset_ids": ("top_p_reset_ids", (list,)),
    "presence_penalty": ("presence_penalty", _NUMBER),
    "frequency_penalty": ("frequency_penalty", _NUMBER),
    "repetition_penalty": ("repetition_penalty", _NUMBER),
    "seed": ("seed", (int,)),
    "stop_token_ids": ("stop_token_ids", (list,)),
    "ignore_eos": ("ignore_eos", (bool,)),
    "bad_words": ("bad_words", (list,)),
    "beam_width": ("beam_width", (int,)),
    "length_penalty": ("length_penalty", _NUMBER),
    "diversity_rate": ("diversity_rate", _NUMBER),
}
_IGNORED = {"user", "n", "logit_bias", "suffix", "best_of"}
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI allows 5 on completions and 20 on chat)."""


@dataclass
class ParsedRequest:
    """What the server runs for one HTTP request."""

    prompts: list[str | list[int]]
    """As the client gave them (text or token ids), before any BOS is added."""
    params: SamplingParams
    stream: bool
    chat: bool
    model: str
    top_logprobs: int | None
    """How many alternatives each token's log probability comes with; ``None`` when logprobs were not asked for."""
    echo: bool = False
    include_usage: bool = False
    bos: int | None = None
    """The token to put before every prompt (``add_bos``), else ``None``."""
    session_id: str | None = None
    """The conversation this request continues (its keys/values are kept between requests)."""

    def engine_prompts(self, tokenizer: Any, sessions: Container[str] = ()) -> list[str | list[int]]:
        """The prompts as the engine gets them: with the BOS token in front when the request asked for it, and a
        chat turn that continues one of ``sessions`` on its own line."""
        prompts = list(self.prompts)
        if self.chat and self.session_id in sessions:
            prompts = ["\n" + prompt for prompt in prompts]
        if self.bos is None:
            return prompts
        return [[self.bos, *(tokenizer.encode(p) if isinstance(p, str) else p)] for p in prompts]


def _type_name(types: tuple[type, ...]) -> str:
    if float in types:
        return "a number"
    return {int: "an integer", list: "an array", bool: "a boolean"}[types[0]]


def client_error(error: ValueError, body: dict[str, Any]) -> RequestError:
    """``error`` (raised by :class:`SamplingParams` or the engine) in the client's words: each setting called by the
    request field the client wrote (``max_tokens``, not ``max_new_tokens``), the first one named as ``param``."""
    message = str(error)
    renames = {"top_logprobs": "top_logprobs" if "top_logprobs" in body else "logprobs",
               "prompt_logprobs": "logprobs"}
    renames.update({field: name for name, (field, _) in _FIELDS.items() if name in body})
    renames.setdefault("max_new_tokens", "max_tokens")
    renames.setdefault("min_new_tokens", "min_tokens")
    spans = []
    for field, name in renames.items():
        spans += [(m.start(), m.end(), name) for m in re.finditer(rf"\b{field}\b", message)]
    for start, end, name in sorted(spans, reverse=True):
        message = message[:start] + name + message[end:]
    first = min(spans, default=None)
    param = first[2] if first else next((n for n in re.findall(r"\w+", message) if n in body), None)
    return RequestError(message, param)


def parse_request(body: Any, chat: bool, model: str, default_max_tokens: int = 16, bos: int | None = None
                  ) -> ParsedRequest:
    """Validate an OpenAI (chat) completion request body; raise :class:`RequestError` on the first problem.

    ``model`` is the served model's name (another name is a 404, as with OpenAI); ``bos`` the tokenizer's
    beginning-of-sequence token, which ``add_bos`` puts in front of the prompt.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    own = {"messages", "top_logprobs"} if chat else {"prompt", "echo"}
    allowed = set(_FIELDS) | _IGNORED | own | {"model", "stream", "stream_options", "stop", "logprobs", "add_bos",
                                               "session_id"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; supported: {sorted(allowed)}", unknown[0])
    if body.get("model") not in (None, model):
        raise RequestError(f"The model `{body['model']}` does not exist; this server serves `{model}`", "model",
                           status=404, code="model_not_found")
    for name, want in (("n", 1), ("best_of", 1)):
        if body.get(name, want) not in (want, None):
            raise RequestError(f"{name} must be 1 (use beam_width for beam search)", name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported; use bad_words to block tokens", "logit_bias")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not 0 < len(session_id) <= 256):
        raise RequestError("session_id must be a string of 1 to 256 characters", "session_id")
    prompts = [chat_prompt(body.get("messages"))] if chat else _prompts(body.get("prompt"))
    if session_id is not None and len(prompts) > 1:
        raise RequestError("a session continues one conversation: send one prompt with session_id", "session_id")
    values: dict[str, Any] = {"max_new_tokens": default_max_tokens, "temperature": 1.0}
    for name, (field, types) in _FIELDS.items():
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise RequestError(f"{name} must be {_type_name(types)}, got {type(value).__name__}", name)
        values[field] = value
    for name, kind in (("stop_token_ids", int), ("bad_words", str), ("top_p_reset_ids", int)):
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
    echo = _flag(body, "echo")
    if values["max_new_tokens"] == 0 and not echo:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise RequestError(f"{name} must be >= 1 (0 only with echo, to score the prompt)", name)
    top_logprobs = _top_logprobs(body, chat)
    if top_logprobs is not None:
        values.update(logprobs=True, top_logprobs=top_logprobs)
        if echo:
            values["prompt_logprobs"] = top_logprobs
    stream = _flag(body, "stream")
    include_usage = _stream_options(body, stream)
    add_bos = _flag(body, "add_bos")
    if add_bos and bos is None:
        raise RequestError("add_bos: the tokenizer has no beginning-of-sequence token; put the start token you want "
                           "in the prompt (as token ids)", "add_bos")
    try:
        params = SamplingParams(**values)
        params.validate()
    except ValueError as error:
        raise client_error(error, body) from None
    if stream and params.beam_width > 1:
        raise RequestError("beam search results cannot be streamed; set stream to false", "stream")
    if stream and echo and top_logprobs is not None:
        raise RequestError("the log probabilities of an echoed prompt are returned without streaming; set stream "
                           "to false", "stream")
    return ParsedRequest(prompts, params, stream, chat, model, top_logprobs, echo, include_usage,
                         bos if add_bos else None, session_id)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean", name)
    return bool(value)


def _top_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """The number of alternatives per token, or ``None`` without logprobs: chat asks with ``logprobs: true`` and
    ``top_logprobs: N``, completions with ``logprobs: N``."""
    name = "top_logprobs" if chat else "logprobs"
    if chat:
        if not _flag(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise RequestError("top_logprobs needs logprobs set to true", "top_logprobs")
            return None
        count = body.get("top_logprobs") or 0
    else:
        count = body.get("logprobs")
        if count is None:
            return None
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TOP_LOGPROBS:
        raise RequestError(f"{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}: how many most likely tokens "
                           f"to return with each token's log probability", name)
    return count


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (``stream_options: {"include_usage": true}``)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
            options.get("include_usage", False), bool):
        raise RequestError('stream_options must be {"include_usage": true or false}', "stream_options")
    return bool(options.get("include_usage"))


def _prompts(prompt: Any) -> list[str | list[int]]:
    def ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and len(prompt) <= 64 and (
            all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt)):
        return list(prompt)
    raise RequestError("prompt must be a string, a list of token ids, or a list of up to 64 of either", "prompt")


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


def token_text(tokenizer: Any, token: int) -> str:
    """One token as text, special tokens spelled out."""
    return tokenizer.decode([token], skip_special_tokens=False)


def _alternatives(tokenizer: Any, top: dict[int, float], token: int, logprob: float) -> dict[str, float]:
    """The most likely tokens and the chosen one (OpenAI returns up to N + 1), by text; where two tokens read the
    same, the likelier one's value is kept, so the largest value is always the most likely token's."""
    alternatives: dict[str, float] = {}
    for alternative, value in [*top.items(), (token, logprob)]:
        alternatives.setdefault(token_text(tokenizer, alternative), value)
    return alternatives


@dataclass
class Scored:
    """Tokens with their log probabilities and most likely alternatives (``None`` where a token has none)."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[dict[int, float] | None]

    @classmethod
    def of(cls, output: GenerationOutput, echo: bool) -> "Scored":
        """The generated tokens of ``output``, preceded by its prompt's when ``echo``."""
        generated = cls(list(output.tokens), list(output.logprobs or []),
                        list(output.top_logprobs or [{} for _ in output.tokens]))
        if not echo:
            return generated
        return cls(list(output.prompt_tokens) + generated.tokens,
                   list(output.prompt_logprobs or [None] * len(output.prompt_tokens)) + generated.logprobs,
                   list(output.prompt_top_logprobs or [None] * len(output.prompt_tokens)) + generated.top)

    def completions_logprobs(self, tokenizer: Any, text_offset: int = 0) -> dict[str, Any]:
        """The legacy completions ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (one dict per
        token, ``None`` for the first prompt token) and ``text_offset`` (each token's start in the text)."""
        strings = [token_text(tokenizer, t) for t in self.tokens]
        offsets = [text_offset + sum(len(s) for s in strings[:i]) for i in range(len(strings))]
        top = [None if value is None else _alternatives(tokenizer, alternatives or {}, token, value)
               for token, value, alternatives in zip(self.tokens, self.logprobs, self.top)]
        return {"tokens": strings, "token_logprobs": self.logprobs, "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs(self, tokenizer: Any) -> dict[str, Any]:
        """The chat ``logprobs`` object: ``content``, one entry per token with its bytes and ``top_logprobs``."""
        def entry(token: int, value: float) -> dict[str, Any]:
            text = token_text(tokenizer, token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(token, value),
                             "top_logprobs": [entry(t, v) for t, v in (alternatives or {}).items()]}
                            for token, value, alternatives in zip(self.tokens, self.logprobs, self.top)]}


def _usage(outputs: list[GenerationOutput]) -> dict[str, Any]:
    prompt_tokens = sum(len(o.prompt_tokens) for o in outputs)
    completion_tokens = sum(o.length for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outputs)}}


def echo_text(prompt: str | list[int], tokenizer: Any) -> str:
    """The prompt as ``echo`` returns it: the text as sent, or the decoded token ids."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def response(request: ParsedRequest, request_id: str, outputs: list[GenerationOutput], tokenizer: Any
             ) -> dict[str, Any]:
    """The non-streaming response body."""
    choices = []
    for index, (prompt, output) in enumerate(zip(request.prompts, outputs)):
        logprobs = None
        if request.top_logprobs is not None:
            scored = Scored.of(output, request.echo)
            logprobs = scored.chat_logprobs(tokenizer) if request.chat else scored.completions_logprobs(tokenizer)
        if request.chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": output.text},
                            "finish_reason": output.finish_reason, "logprobs": logprobs})
        else:
            text = (echo_text(prompt, tokenizer) if request.echo else "") + (output.text or "")
            choices.append({"index": index, "text": text, "finish_reason": output.finish_reason,
                            "logprobs": logprobs})
    return {"id": request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": choices, "usage": _usage(outputs)}


def chunk(request: ParsedRequest, request_id: str, index: int, text: str | None, finish_reason: str | None,
          first: bool = False, scored: Scored | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """One server-sent event of a streaming response (``scored``: the log probabilities of its tokens)."""
    logprobs = None
    if scored is not None and scored.tokens:
        logprobs = scored.chat_logprobs(tokenizer) if request.chat else scored.completions_logprobs(tokenizer)
    if request.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason}
    if request.top_logprobs is not None:
        choice["logprobs"] = logprobs
    payload = {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
               "created": int(time.time()), "model": request.model, "choices": [choice]}
    if request.include_usage:
        payload["usage"] = None
    return payload


def usage_chunk(request: ParsedRequest, request_id: str, outputs: list[GenerationOutput]) -> dict[str, Any]:
    """The last event of a stream with ``include_usage``: no choices, the usage of the whole request."""
    return {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [], "usage": _usage(outputs)}
