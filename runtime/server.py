"""``flashvl serve``'s HTTP layer: an OpenAI Chat Completions subset over the continuous-batching scheduler.

    app = create_app(scheduler, pipeline, ServeOptions(model_name="fvl"))   # a FastAPI app

Routes: ``GET /health`` (200 only while the graphs are loaded and the scheduler runs), ``GET /metrics``
(Prometheus text), ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (plain
JSON or SSE streaming). One request, in order:

1. the edge (:class:`_Edge`, pure ASGI so streaming and disconnects pass through untouched): request id,
   the ``Host`` check (``allowed_hosts``, against DNS rebinding), cross-origin POSTs refused (403), the
   API key for ``/v1/*`` (several keys: each its own cache salt), the access-log line and the request
   counter when the response is done;
2. the body: ``application/json`` only (415), read up to ``max_body_bytes`` (413) within
   ``body_read_timeout_s`` (408), parsed as JSON and checked field by field (:func:`parse_chat_request`,
   in a worker thread: a json_schema is compiled there, in its own bounded process); message text is
   capped at ``max_prompt_chars`` before anything is tokenized. OpenAI content parts become the
   template's text, each image part one ``pipeline.prompts.placeholder`` (``[image, text]`` renders
   exactly what ``flashvl chat --image I --prompt T`` renders); images are only ``data:`` URLs or
   ``file://`` paths under the allowed root;
3. ``pipeline.prepare_prompt`` in a worker thread, with the request's cache salt (image decoding under
   the decode limits, the chat template in its bounded renderer, tokenization with the GIL released;
   it raises ImageError / PromptError before anything expensive runs);
4. ``scheduler.submit`` (429 when the queue is full, 503 when draining), then the events become a
   ``chat.completion`` or ``chat.completion.chunk`` lines. A client that goes away cancels its request
   (``handle.cancel()``), so its batch slot frees at the next step.

Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``: a
FlashVLError is a 400 with its one-line message; anything unexpected is a 500 with a generic message
and a logged traceback. The limits and why: docs/security.md. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import FlashVLError, PromptError, one_line
from .generate import SamplingParams
from .prompt import check_text
from .scheduler import FinishEvent, GenerationRequest, QueueFullError, ShuttingDownError, TokenEvent

log = logging.getLogger("flashvl_edge.serve")
access_log = logging.getLogger("flashvl_edge.serve.access")

MiB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 20 * MiB
# 256 Ki characters of message text: more than a 32k context holds, tokenized in ~0.4 s (a 2B model's
# tokenizer on this CPU), where 19 MiB took 26 s and 4.7 GB
DEFAULT_MAX_PROMPT_CHARS = 256 * 1024
# a 16-megapixel RGB photo (4 bytes a pixel as decoded, 4 more for the RGB copy)
DEFAULT_MAX_IMAGE_BYTES = 128 * MiB
# over the network: no TIFF (libtiff and its codecs are a large surface a camera frame does not need)
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
LOCALHOST_NAMES = ("localhost", "127.0.0.1", "::1")
# OpenAI's default sampling: a client that sends no temperature gets temperature 1, as from the API
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 256  # only for a pipeline that does not say its context length
_ROLES = ("system", "user", "assistant")


@dataclass
class ServeOptions:
    """What the HTTP layer enforces (``flashvl serve`` flags of the same names)."""

    model_name: str
    api_key: str | list | None = None  # with one, every /v1/* route needs "Authorization: Bearer KEY"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allowed_local_media_path: str | os.PathLike | None = None  # file:// images only below this directory
    max_images: int = 8  # image parts per request, counted before any is decoded
    grace_period_s: float = 30.0  # draining: in-flight requests may finish within this
    retry_after_s: int = 1  # the Retry-After of a 429
    max_model_len: int | None = None  # reported by /v1/models (the context)
    # -- bounds on what one request may cost (docs/security.md has each with its reason) ----------
    api_keys: tuple = ()  # more keys besides api_key; with several, each key is its own cache tenant
    # Host header names answered (DNS rebinding): "auto" (flashvl serve's default) is localhost names
    # on a loopback address and any name elsewhere; a tuple of names ("*": any); None: no check
    allowed_hosts: tuple | str | None = None
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # message text per request, before tokenizing
    body_read_timeout_s: float = 30.0  # the whole body must arrive within this (408 otherwise)
    header_read_timeout_s: float = 10.0  # a connection's request headers must arrive within this
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 64 * 1024  # request line + headers (h11's max incomplete event size)
    max_schema_bytes: int = 64 * 1024  # a json_schema, as JSON
    schema_compile_timeout_s: float = 5.0
    schema_compile_memory_bytes: int = 256 * MiB
    max_template_chars: int | None = None  # the rendered chat template; None: max_prompt_chars + 64 Ki
    template_timeout_s: float = 2.0
    template_memory_bytes: int = 128 * MiB
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # estimated decode memory per image (header)
    max_concurrent_decodes: int = 2
    image_formats: tuple = DEFAULT_IMAGE_FORMATS

    @classmethod
    def coerce(cls, options: "ServeOptions | Mapping[str, Any]") -> "ServeOptions":
        return options if isinstance(options, cls) else cls(**dict(options))

    def keys(self) -> list[str]:
        """Every accepted API key (``api_key`` and ``api_keys``; comma-separated lists are split)."""
        given = self.api_key if isinstance(self.api_key, (list, tuple)) else [self.api_key] if self.api_key else []
        out: list[str] = []
        for k in list(given) + list(self.api_keys or ()):
            out += [x.strip() for x in str(k).split(",") if x.strip()]
        return list(dict.fromkeys(out))

    def template_chars(self) -> int:
        return self.max_template_chars if self.max_template_chars is not None else self.max_prompt_chars + 65536


# --------------------------------------------------------------------------------------------
# The request body, as an OpenAPI schema (documentation and the tests' fuzzing; the checks are
# parse_chat_request's, which also refuse what this schema allows but the server does not support)

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"],
               "properties": {"type": {"const": "image_url"},
                              "image_url": {"type": "object", "required": ["url"],
                                            "properties": {"url": {"type": "string"}}}}}
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": list(_ROLES)},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [_TEXT_PART, _IMAGE_PART]}}]}}}
CHAT_REQUEST_SCHEMA = {
    "type": "object", "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "seed": {"type": "integer", "minimum": 0},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"},
                                                             "continuous_usage_stats": {"type": "boolean"}}},
        "n": {"type": "integer", "minimum": 1},
        "ignore_eos": {"type": "boolean"},
        "cache_salt": {"type": "string", "minLength": 1, "maxLength": 256},
        "response_format": {"anyOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {"type": "object", "required": ["schema"],
                                "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}}}}]},
    },
}


# --------------------------------------------------------------------------------------------
# Limits on work per request, applied to the process's decoders, compilers and template renderer


def _apply_limits(pipeline, options: ServeOptions) -> None:
    """Image decode limits (bytes, formats, concurrent decodes), the json_schema compile budget and
    the chat template's bounds, from ``options``. A stand-in pipeline without a PromptBuilder keeps
    its own rendering."""
    from . import images

    if pipeline is not None:
        try:
            pipeline.decode_limits = images.DecodeLimits(max_bytes=options.max_image_bytes,
                                                         formats=tuple(options.image_formats),
                                                         max_concurrent=options.max_concurrent_decodes)
        except AttributeError:  # a stand-in without attributes of its own
            pass
    from . import structured

    structured.configure(structured.GrammarLimits(max_schema_bytes=options.max_schema_bytes,
                                                  timeout_s=options.schema_compile_timeout_s,
                                                  memory_bytes=options.schema_compile_memory_bytes))
    prompts = getattr(pipeline, "prompts", None)
    if prompts is not None and hasattr(prompts, "render_limits"):
        from .prompt import RenderLimits

        prompts.render_limits = RenderLimits(max_chars=options.template_chars(), timeout_s=options.template_timeout_s,
                                             memory_bytes=options.template_memory_bytes, isolate=True)


def _close_workers() -> None:
    """The isolated schema compilers and template renderers die with the server."""
    from . import structured
    from .prompt import close_render_workers

    close_render_workers()
    structured.configure(structured.LIMITS)


def http_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a header read timeout: a connection whose next request's headers
    have not all arrived ``header_timeout_s`` after it opened (or after its last response) is closed.
    uvicorn's own keep-alive timeout stops counting at the first byte, so without this a client
    sending one header byte a minute holds a connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def _arm(self) -> None:
            cycle = self.cycle
            self.loop.call_later(header_timeout_s, self._headers_late, cycle)

        def _headers_late(self, armed_cycle) -> None:
            if self.cycle is armed_cycle and not self.transport.is_closing():
                # no new request started since the timer was set: the headers are late
                if armed_cycle is None or armed_cycle.response_complete:
                    self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return Protocol


def limit_options(args) -> dict:
    """The ServeOptions fields of ``flashvl serve``'s limit flags (runtime/cli_serve.py)."""
    # unset: localhost names when listening on a loopback address, no check when listening elsewhere
    hosts = LOCALHOST_NAMES if _is_loopback(str(args.host)) else None
    if args.allowed_hosts is not None:
        hosts = tuple(h.strip().lower().strip("[]") for h in args.allowed_hosts.split(",") if h.strip())
    return dict(
        allowed_hosts=hosts, max_prompt_chars=args.max_prompt_chars, body_read_timeout_s=args.body_read_timeout,
        header_read_timeout_s=args.header_read_timeout, keep_alive_timeout_s=args.keep_alive_timeout,
        max_header_bytes=args.max_header_bytes, max_schema_bytes=args.max_schema_bytes,
        schema_compile_timeout_s=args.schema_compile_timeout, schema_compile_memory_bytes=args.schema_compile_memory,
        max_template_chars=args.max_template_chars, template_timeout_s=args.template_timeout,
        template_memory_bytes=args.template_memory, max_image_bytes=args.max_image_bytes,
        max_concurrent_decodes=args.max_concurrent_decodes,
        image_formats=tuple(f.strip().upper() for f in args.image_formats.split(",") if f.strip()))


_KNOWN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def check_limit_args(args) -> None:
    """One FlashVLError line for a bad limit flag (called by cli_serve._check, before the bundle loads)."""
    for name in ("max_prompt_chars", "max_header_bytes", "max_schema_bytes", "schema_compile_memory",
                 "template_memory", "max_image_bytes", "max_concurrent_decodes"):
        if getattr(args, name) < 1:
            raise FlashVLError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_template_chars is not None and args.max_template_chars < 1:
        raise FlashVLError(f"--max-template-chars must be at least 1, got {args.max_template_chars}")
    for name in ("body_read_timeout", "header_read_timeout", "keep_alive_timeout", "schema_compile_timeout",
                 "template_timeout"):
        v = getattr(args, name)
        if not math.isfinite(v) or v <= 0:
            raise FlashVLError(f"--{name.replace('_', '-')} must be a number of seconds > 0, got {v}")
    formats = [f.strip().upper() for f in args.image_formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in _KNOWN_FORMATS]
    if not formats or unknown:
        raise FlashVLError(f"--image-formats takes a comma-separated list from {','.join(_KNOWN_FORMATS)}, "
                           f"got {args.image_formats!r}")
    if args.allowed_hosts is not None and not [h for h in args.allowed_hosts.split(",") if h.strip()]:
        raise FlashVLError("--allowed-hosts needs at least one name (or '*' for any)")


# --------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = one_line(message)
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
_INTERNAL = "internal server error; the server log has the details"


def _error_for(err: BaseException, retry_after_s: int = 1) -> ApiError:
    """The HTTP answer for an exception raised while preparing or submitting a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, QueueFullError):
        return ApiError(429, str(err), code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(err, ShuttingDownError):
        return ApiError(503, str(err), code="shutting_down")
    if isinstance(err, FlashVLError):
        return ApiError(400, str(err), param=_param_of(str(err)), code=type(err).__name__)
    if isinstance(err, MemoryError):
        return ApiError(503, "out of memory while preparing the request; send smaller or fewer images",
                        code="out_of_memory")
    return ApiError(500, _INTERNAL, code="internal_error")


# SamplingParams.validate() names the field first: map it back to the request's name
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}


def _param_of(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return _PARAM_NAMES.get(first)


# --------------------------------------------------------------------------------------------
# Request parsing


@dataclass
class ImageRef:
    """One image part: a data: URL's base64 text or a file:// URL, and where it was in the request."""

    kind: str  # "data" | "file"
    value: str
    where: str


@dataclass
class ChatRequest:
    messages: list[dict]  # [{"role", "content": str}] with one placeholder per image
    images: list[ImageRef]
    params: SamplingParams  # max_new_tokens is set once the prompt's length is known (max_tokens None)
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    # vLLM's extension: a chunk for every token (its text may be "") with the usage so far, so a
    # client can time each token even when its text is held back or empty
    continuous_usage: bool = False
    cache_salt: str = ""  # vLLM's field: requests with different salts share no cached KV or image


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise ApiError(400, f"{name} must be an integer, got {v!r}", param=name)
    return v


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a finite number, got {v!r}", param=name)
    return v


def _bool(body: dict, name: str, where: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{where or name} must be true or false, got {v!r}", param=where or name)
    return v


def parse_chat_request(body: Any, options: ServeOptions, placeholder: str) -> ChatRequest:
    """A checked chat request from the parsed JSON body, or ApiError (400/404) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {model!r}", param="model")
    if model and model != options.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {options.model_name!r}",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    messages, images = _parse_messages(body.get("messages"), placeholder, options)
    n = _int(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1 (this server returns one choice per request), got {n}", param="n")
    max_tokens = _int(body, "max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{name} must be a positive integer, got {max_tokens}", param=name)
    top_k = _int(body, "top_k")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    if isinstance(stop, list) and (len(stop) > 16 or any(not isinstance(s, str) for s in stop)):
        raise ApiError(400, "stop must be a string or a list of at most 16 strings", param="stop")
    seed = _int(body, "seed")
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt or len(cache_salt) > 256):
        raise ApiError(400, "cache_salt must be a non-empty string of at most 256 characters", param="cache_salt")
    json_schema, json_object = _response_format(body.get("response_format"))
    try:
        params = SamplingParams(
            json_schema=json_schema, json_object=json_object,
            max_new_tokens=max_tokens or 1,
            temperature=_number(body, "temperature", DEFAULT_TEMPERATURE),
            top_k=0 if top_k in (None, -1) else top_k,  # -1 is vLLM's "off"
            top_p=_number(body, "top_p", 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            seed=seed,
            stop=stop or (),
            ignore_eos=_bool(body, "ignore_eos"),
        ).validate()
    except PromptError as e:
        param = _param_of(str(e))
        if param is None and str(e).startswith(("json_schema", "invalid or unsupported json_schema")):
            param = "response_format.json_schema.schema"
        raise ApiError(400, str(e).replace("max_new_tokens", name), param=name if param == "max_tokens" else param)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, f"stream_options must be an object, got {opts!r}", param="stream_options")
    include_usage = _bool(opts or {}, "include_usage", "stream_options.include_usage")
    continuous = _bool(opts or {}, "continuous_usage_stats", "stream_options.continuous_usage_stats")
    return ChatRequest(messages, images, params, max_tokens, stream, include_usage, continuous,
                       cache_salt=cache_salt or "")


def _response_format(fmt: Any) -> tuple[dict | None, bool]:
    """OpenAI's ``response_format``: text (default), ``{"type": "json_object"}``, or
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``; the answer is then
    decoded under that constraint (runtime/structured.py)."""
    if fmt is None:
        return None, False
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text") and isinstance(fmt, dict):
        return None, False
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}} "
                                "with the schema as an object", param="response_format.json_schema.schema")
        return schema, False
    raise ApiError(400, f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                        "'json_schema'", param="response_format")


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the answer's meaning if silently ignored."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(400, f"{name} (function calling) is not supported by this server", param=name)
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice is not supported by this server", param="tool_choice")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and v != 0:
            raise ApiError(400, f"{name} is not supported by this server; use repetition_penalty", param=name)
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")


def _parse_messages(messages: Any, placeholder: str, options: ServeOptions) -> tuple[list[dict], list[ImageRef]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out: list[dict] = []
    images: list[ImageRef] = []
    n_chars = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"{where}.role {role!r} is not supported; use 'system', 'user' or 'assistant'",
                           param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            parts: list[tuple[str, Any]] = [("text", _text(content, placeholder, f"{where}.content"))]
        elif isinstance(content, list):
            parts = [_part(p, role, placeholder, f"{where}.content[{j}]", options) for j, p in enumerate(content)]
        else:
            raise ApiError(400, f"{where}.content must be a string or a list of content parts",
                           param=f"{where}.content")
        text, prev = "", None
        for kind, value in parts:
            if prev is not None:
                # consecutive images touch (as PromptBuilder.user_message writes them); any other
                # boundary is a newline, so [image, text] renders placeholder + "\n" + text
                text += "" if (prev == "image" and kind == "image") else "\n"
            if kind == "image":
                text += placeholder
                images.append(value)
            else:
                text += value
            prev = kind
        n_chars += len(text)
        if n_chars > options.max_prompt_chars:
            # before anything is tokenized: the cost of tokenizing grows with the text, not the context
            raise ApiError(400, f"the messages hold more than {options.max_prompt_chars:,} characters of text "
                                "(--max-prompt-chars); send a shorter conversation", param="messages",
                           code="prompt_too_long")
        out.append({"role": role, "content": text})
    if len(images) > options.max_images:
        raise ApiError(400, f"the request has {len(images)} images but this server takes at most "
                            f"{options.max_images} per request (--max-images)", param="messages")
    return out, images


def _text(text: Any, placeholder: str, where: str) -> str:
    if not isinstance(text, str):
        raise ApiError(400, f"{where} must be a string, got {type(text).__name__}", param=where)
    if placeholder and placeholder in text:
        raise ApiError(400, f"{where} contains {placeholder!r}, which this model reserves for images; "
                            "send images as image_url content parts", param=where)
    try:
        return check_text(text, "message text")
    except PromptError as e:
        raise ApiError(400, f"{where}: {e}", param=where) from None


def _part(part: Any, role: str, placeholder: str, where: str, options: ServeOptions) -> tuple[str, Any]:
    if not isinstance(part, dict):
        raise ApiError(400, f"{where} must be an object with a type", param=where)
    kind = part.get("type")
    if kind == "text":
        return "text", _text(part.get("text"), placeholder, f"{where}.text")
    if kind == "image_url":
        if role != "user":
            raise ApiError(400, f"{where}: only user messages can hold images", param=where)
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return "image", _image_ref(url, f"{where}.image_url.url", options)
    raise ApiError(400, f"{where}.type {kind!r} is not supported; use 'text' or 'image_url'", param=f"{where}.type")


def _image_ref(url: Any, where: str, options: ServeOptions) -> ImageRef:
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where} must be a non-empty string", param=where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        head, comma, data = url[5:].partition(",")
        if not comma:
            raise ApiError(400, f"{where} is not a valid data: URL (no comma before the data)", param=where)
        fields = [f.strip().lower() for f in head.split(";")]
        if "base64" not in fields[1:]:
            raise ApiError(400, f"{where}: only base64 data: URLs are supported (data:image/png;base64,...)",
                           param=where)
        if fields[0] and not fields[0].startswith("image/"):
            raise ApiError(400, f"{where}: the data: URL's media type {fields[0]!r} is not an image", param=where)
        return ImageRef("data", data, where)
    if scheme in ("http", "https"):
        raise ApiError(400, f"{where}: remote image URLs are not fetched (the server makes no outbound "
                            "requests); send the image as a base64 data: URL", param=where, code="remote_url_refused")
    if scheme == "file":
        if options.allowed_local_media_path is None:
            raise ApiError(400, f"{where}: file:// URLs are disabled; start the server with "
                                "--allowed-local-media-path DIR, or send the image as a data: URL", param=where)
        return ImageRef("file", url, where)
    raise ApiError(400, f"{where}: unsupported URL scheme {scheme or url[:16]!r}; send the image as a base64 "
                        "data: URL", param=where)


# --------------------------------------------------------------------------------------------
# Images: data: URLs and local files (worker thread)


def _decode_base64(ref: ImageRef) -> bytes:
    data = "".join(ref.value.split())
    if "-" in data or "_" in data:  # the URL-safe alphabet
        data = data.translate(str.maketrans("-_", "+/"))
    if len(data) % 4:
        raise ApiError(400, f"{ref.where}: the base64 data is truncated ({len(data)} characters, not a multiple "
                            "of 4); send the whole image", param=ref.where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{ref.where}: the data: URL is not valid base64 ({e})", param=ref.where) from None


def _read_local(ref: ImageRef, root: Path, limit: int) -> bytes:
    """The bytes of a file:// image below ``root``: resolved first (no escaping through '..' or a
    symlink), opened without following a link, checked again through the open descriptor."""
    parts = urlsplit(ref.value)
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, f"{ref.where}: file:// URLs must name a local path (file:///path)", param=ref.where)
    raw = unquote(parts.path)
    refused = ApiError(400, f"{ref.where}: the file is not below the allowed local media path", param=ref.where,
                       code="path_not_allowed")
    if "\x00" in raw or not os.path.isabs(raw):
        raise refused
    try:
        resolved = Path(raw).resolve()
    except (OSError, RuntimeError):
        raise refused from None
    if not resolved.is_relative_to(root):
        raise refused
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ApiError(400, f"{ref.where}: no such file {str(resolved)!r}", param=ref.where) from None
    except OSError as e:
        raise ApiError(400, f"{ref.where}: cannot open {str(resolved)!r}: {e.strerror or e}", param=ref.where) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ApiError(400, f"{ref.where}: {str(resolved)!r} is not a regular file", param=ref.where)
    with os.fdopen(fd, "rb") as f:
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc) and not Path(os.readlink(proc)).is_relative_to(root):
            raise refused  # a directory on the way was swapped for a link after the check
        if st.st_size > limit:
            raise ApiError(413, f"{ref.where}: the file is {st.st_size:,} bytes, above the limit of {limit:,} "
                                "(--max-body-bytes)", param=ref.where, code="request_too_large")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{ref.where}: the file is above the limit of {limit:,} bytes", param=ref.where,
                       code="request_too_large")
    return data


def _prepare(pipeline, chat: ChatRequest, root: Path | None, limit: int, salt: bytes = b""):
    """Worker thread: the image bytes, then ``pipeline.prepare_prompt`` (decode, template, checks),
    with the request's cache salt when it has one."""
    images = [_decode_base64(r) if r.kind == "data" else _read_local(r, root, limit) for r in chat.images]
    if salt:
        return pipeline.prepare_prompt(chat.messages, images, cache_salt=salt)
    return pipeline.prepare_prompt(chat.messages, images)


def _cache_salt(key_salt: bytes, request_salt: str) -> bytes:
    """The salt a request's cache entries are keyed with: its API key's (with several keys) and its
    own ``cache_salt`` field, either of which may be empty."""
    if not request_salt:
        return key_salt
    return key_salt + b"\0" + request_salt.encode("utf-8")


# --------------------------------------------------------------------------------------------
# Metrics


class _Metrics:
    """One registry per app, so several apps in one process (tests) do not clash."""

    def __init__(self, scheduler, pipeline=None) -> None:
        r = self.registry = CollectorRegistry()
        # the reuse caches, read at scrape time: hit rate = hits / (hits + misses)
        for name, what in (("image_cache", "image-embedding cache"), ("prefix_cache", "prefix KV cache")):
            cache = getattr(pipeline, name, None)
            if cache is None:
                continue
            for key, text in (("hits", "lookups that found"), ("misses", "lookups that missed"),
                              ("bytes", "bytes held"), ("evictions", "entries evicted")):
                Gauge(f"flashvl_{name}_{key}", f"{what}: {text}", registry=r) \
                    .set_function(lambda c=cache, f=key: c.stats()[f])
        self.requests = Counter("flashvl_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        Gauge("flashvl_queue_depth", "requests waiting for a batch slot", registry=r) \
            .set_function(lambda: scheduler.queue_depth)
        Gauge("flashvl_running_requests", "requests in the running batch", registry=r) \
            .set_function(lambda: scheduler.running)
        Gauge("flashvl_max_batch", "batch slots", registry=r).set_function(lambda: scheduler.max_batch)
        self.prompt_tokens = Counter("flashvl_prompt_tokens", "prompt tokens of finished requests (image "
                                     "tokens included)", registry=r)
        self.cached_tokens = Counter("flashvl_cached_prompt_tokens", "prompt tokens served from a cache",
                                     registry=r)
        self.generated_tokens = Counter("flashvl_generation_tokens", "generated tokens", registry=r)
        self.finished = Counter("flashvl_finished_requests", "chat completions by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("flashvl_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 40, 80), registry=r)
        self.itl = Histogram("flashvl_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=(.001, .0025, .005, .01, .02, .04, .06, .08, .1, .15, .2, .3, .5, 1, 2.5),
                             registry=r)
        self.duration = Histogram("flashvl_request_duration_seconds", "chat completion arrival to its last token",
                                  buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 20, 40, 80, 160), registry=r)


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")


def _route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


# --------------------------------------------------------------------------------------------
# The edge: request id, API key, access log, request counter


@dataclass
class _RequestInfo:
    id: str
    start: float
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    finish: str | None = None


class _Edge:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer streams and hide disconnects)."""

    def __init__(self, app, state: "_AppState") -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = _RequestInfo(id=f"req-{uuid.uuid4().hex[:16]}", start=time.perf_counter())
        scope["flashvl"] = info

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                info.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", info.id.encode())]}
            await send(message)

        path = scope.get("path", "")
        try:
            if not self._host_allowed(scope):
                # DNS rebinding: a web page whose name now points at this device may not talk to it
                await _send_json(send_with_id, ApiError(400, "the Host header names a host this server does not "
                                                             "answer for (--allowed-hosts)", code="invalid_host"))
                return
            if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and self._cross_origin(scope):
                # a web page on another origin (CSRF): browsers send Origin with every cross-site POST
                await _send_json(send_with_id, ApiError(403, "cross-origin requests are refused: the Origin header "
                                                             "does not match the Host", code="cross_origin"))
                return
            if path.startswith("/v1"):
                salt = self._authorized(scope)
                if salt is None:
                    await _send_json(send_with_id, ApiError(401, "a valid API key is required: send the header "
                                                                 "'Authorization: Bearer KEY'", code="invalid_api_key"))
                    return
                scope["flashvl.key_salt"] = salt
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            # uvicorn cuts what is still running when the grace period ends: one line, no traceback
            info.finish = info.finish or "cancelled"
            log.warning("flashvl serve: %s cut at the end of the grace period", info.id)
        except Exception:  # noqa: BLE001 - the last resort: log it, answer 500 if nothing was sent yet
            log.exception("flashvl serve: %s %s %s failed", info.id, scope.get("method"), path)
            if info.status is None:
                await _send_json(send_with_id, ApiError(500, _INTERNAL, code="internal_error"))
        finally:
            # 499: the client went away before any response was sent
            status = info.status if info.status is not None else 499
            self.state.metrics.requests.labels(_route_label(path), str(status)).inc()
            access_log.info(_access_line(info, scope, status))

    def _authorized(self, scope) -> bytes | None:
        """None when a key is required and the request has none of them; else the key's cache salt
        (b"" without keys or with one key: a single tenant shares its caches)."""
        keys = self.state.keys
        if not keys:
            return b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                found = None
                for key, salt in keys:  # every key compared, in constant time each
                    if hmac.compare_digest(token, key) and scheme.lower() == b"bearer":
                        found = salt
                return found
        return None

    @staticmethod
    def _cross_origin(scope) -> bool:
        origin = host = None
        for name, value in scope.get("headers", []):
            if name == b"origin":
                origin = value.decode("latin-1").strip().lower()
            elif name == b"host":
                host = value.decode("latin-1").strip().lower()
        if origin is None:
            return False  # not a browser's cross-site request
        return urlsplit(origin).netloc != (host or "")

    def _host_allowed(self, scope) -> bool:
        host = None
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1").strip().lower()
                break
        allowed = self.state.options.allowed_hosts
        if allowed is None:
            return True
        if allowed == "auto":
            server = scope.get("server") or ("", 0)
            if not _is_loopback(server[0]):
                return True  # bound to the network: names are the operator's business (--allowed-hosts)
            allowed = LOCALHOST_NAMES
        if "*" in allowed:
            return True
        if host is None:
            return False
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0] \
            if host.count(":") == 1 else host
        return name.rstrip(".") in allowed or (name.endswith(".localhost") and "localhost" in allowed)


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address in ("localhost", "")


def _access_line(info: _RequestInfo, scope, status: int) -> str:
    def opt(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)

    # the path is percent-decoded client text: no control characters into the log
    path = "".join(c if c.isprintable() and c != " " else "?" for c in scope.get("path", "-"))[:200]
    return (f"flashvl serve: {info.id} {scope.get('method', '-')} {path} {status} "
            f"prompt_tokens={opt(info.prompt_tokens)} completion_tokens={opt(info.completion_tokens)} "
            f"ttft={opt(info.ttft_s and info.ttft_s * 1e3, '{:.1f}ms')} "
            f"duration={(time.perf_counter() - info.start) * 1e3:.1f}ms finish={opt(info.finish)}")


async def _send_json(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# The app


@dataclass
class _AppState:
    scheduler: Any
    pipeline: Any
    options: ServeOptions
    metrics: _Metrics
    media_root: Path | None
    created: int = field(default_factory=lambda: int(time.time()))
    loaded: bool = True  # the app is made after the pipeline opened its graphs
    keys: list = field(default_factory=list)  # [(key bytes, its cache salt)]
    draining: bool = False
    drain_started: float | None = None

    def drain(self) -> None:
        """Stop taking requests (503) and note when, so the grace period counts from here. Called
        from the SIGTERM handler; setting two attributes is all it does."""
        if not self.draining:
            self.draining, self.drain_started = True, time.monotonic()

    def remaining_grace(self) -> float:
        if self.drain_started is None:
            return self.options.grace_period_s
        return max(0.0, self.options.grace_period_s - (time.monotonic() - self.drain_started))


def create_app(scheduler, pipeline, options: ServeOptions | Mapping[str, Any]) -> FastAPI:
    """The server for a started ``scheduler`` over ``pipeline``. The app's lifespan shutdown drains
    the scheduler (``scheduler.shutdown`` with what is left of the grace period)."""
    from contextlib import asynccontextmanager

    options = ServeOptions.coerce(options)
    root = None
    if options.allowed_local_media_path is not None:
        root = Path(options.allowed_local_media_path).resolve()
        if not root.is_dir():
            raise FlashVLError(f"--allowed-local-media-path {str(root)!r} is not a directory")
    if options.max_model_len is None:
        generator = getattr(pipeline, "generator", None)
        options.max_model_len = getattr(generator, "max_context", None)
    state = _AppState(scheduler, pipeline, options, _Metrics(scheduler, pipeline), root)
    keys = options.keys()
    # one key: one tenant (no salt, as without keys); several: each key its own cache tenant
    state.keys = [(k.encode(), hashlib.sha256(b"flashvl api key\0" + k.encode()).digest() if len(keys) > 1 else b"")
                  for k in keys]
    _apply_limits(pipeline, options)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.drain()
        await run_in_threadpool(scheduler.shutdown, state.remaining_grace())
        _close_workers()

    # The OpenAPI document is not served (openapi_url=None); app.openapi() builds it for the tests'
    # schema-driven fuzzing, with the chat request's body schema from CHAT_REQUEST_SCHEMA.
    app = FastAPI(title="flashvl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.flashvl = state
    app.add_middleware(_Edge, state=state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not (state.loaded and scheduler.ready):
            return JSONResponse({"status": "unavailable: the scheduler is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": options.model_name, "object": "model", "created": state.created, "owned_by": "flashvl-edge",
                "max_model_len": options.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != options.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {options.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": CHAT_REQUEST_SCHEMA}}}})
    async def chat_completions(request: Request):
        info: _RequestInfo = request.scope["flashvl"]
        info.id = rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            _check_content_type(request)
            body = await _read_json(request, options.max_body_bytes, options.body_read_timeout_s)
            # in a worker thread: a json_schema is compiled here (in its own bounded process)
            chat = await run_in_threadpool(parse_chat_request, body, options, pipeline.prompts.placeholder)
            if state.draining:
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            salt = _cache_salt(request.scope.get("flashvl.key_salt", b""), chat.cache_salt)
            prepared = await run_in_threadpool(_prepare, pipeline, chat, root, options.max_body_bytes, salt)
            if chat.max_tokens is None:  # as many as fit (the scheduler also stops at the context)
                chat.params.max_new_tokens = max(1, options.max_model_len - len(prepared.token_ids)) \
                    if options.max_model_len else DEFAULT_MAX_TOKENS
            if state.draining:
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            handle = scheduler.submit(GenerationRequest(prepared, chat.params, rid), asyncio.get_running_loop())
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error object
            err = _error_for(e, options.retry_after_s)
            if err.status >= 500 and err.code == "internal_error":
                log.error("flashvl serve: %s failed", rid, exc_info=e)
            return err.response()
        info.prompt_tokens = len(prepared.token_ids)
        run = _Run(handle, state.metrics, info, rid, options.model_name)
        if chat.stream:
            return StreamingResponse(run.sse(request.receive, chat.include_usage, chat.continuous_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.complete(request.receive)

    return app


def _check_content_type(request: Request) -> None:
    """415 unless the body is declared JSON: a web page can send a cross-site text/plain or form POST
    without a CORS preflight, but not an application/json one."""
    ctype = request.headers.get("content-type")
    if ctype is None:
        return  # read as JSON (what curl --data-binary and older clients send); a browser's blind POST
        # of a typeless Blob is refused by the Origin check instead (_Edge._cross_origin)
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                            f"{ctype[:80]!r}", code="unsupported_media_type")


async def _read_json(request: Request, limit: int, timeout_s: float | None = None) -> Any:
    """The body (at most ``limit`` bytes: the declared Content-Length first, then what really
    arrives, all of it within ``timeout_s``) parsed as JSON; ApiError 413 / 408 / 400 otherwise."""
    too_large = ApiError(413, f"the request body is larger than {limit:,} bytes (--max-body-bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > 2 * limit:
            raise too_large  # not worth reading: the client may see a reset instead of the 413
    buf = bytearray()
    stream = request.stream()

    async def read() -> None:
        async for chunk in stream:
            buf.extend(chunk)
            if len(buf) > limit:
                return

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (--body-read-timeout)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    if len(buf) > limit:
        await _discard(stream, 2 * limit - len(buf))
        raise too_large
    if not buf:
        raise ApiError(400, "the request body is empty; send a JSON object")

    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(bytes(buf), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({one_line(str(e))[:200]})") from None


async def _discard(stream, budget: int, timeout_s: float = 2.0) -> None:
    """Read on (and drop) up to ``budget`` bytes of a refused body before answering 413: closing a
    socket with unread data makes the kernel reset the connection, and the reset can overtake the
    response on its way to the client."""
    async def drain() -> None:
        left = budget
        async for chunk in stream:
            left -= len(chunk)
            if left <= 0:
                return

    try:
        await asyncio.wait_for(drain(), timeout_s)
    except Exception:  # noqa: BLE001 - a timeout or a client gone: the 413 is sent either way
        pass


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _Run:
    """One submitted request: its events as a chat.completion or as SSE chunks, with its metrics."""

    def __init__(self, handle, metrics: _Metrics, info: _RequestInfo, rid: str, model: str) -> None:
        self.handle, self.metrics, self.info = handle, metrics, info
        self.rid, self.model, self.created = rid, model, int(time.time())
        self.last_token: float | None = None
        self.tokens = 0
        self.finish: FinishEvent | None = None

    # -- events -> metrics
    def _token(self, ev: TokenEvent) -> None:
        if self.last_token is None:
            self.info.ttft_s = max(0.0, ev.time - self.info.start)
            self.metrics.ttft.observe(self.info.ttft_s)
        else:
            self.metrics.itl.observe(max(0.0, ev.time - self.last_token))
        self.last_token = ev.time
        self.tokens += 1

    def _finished(self, ev: FinishEvent) -> None:
        self.finish = ev
        u = ev.usage
        self.info.prompt_tokens, self.info.completion_tokens, self.info.finish = \
            u.prompt_tokens, u.completion_tokens, ev.finish_reason
        m = self.metrics
        m.prompt_tokens.inc(u.prompt_tokens)
        m.cached_tokens.inc(u.cached_tokens)
        m.generated_tokens.inc(u.completion_tokens)
        m.finished.labels(ev.finish_reason).inc()
        m.duration.observe(max(0.0, ev.time - self.info.start))

    def _abandoned(self) -> None:
        """The client left before the end: cancel, and count what was generated for it."""
        self.handle.cancel()
        if self.finish is None:
            self.info.completion_tokens, self.info.finish = self.tokens, "cancelled"
            self.metrics.prompt_tokens.inc(self.info.prompt_tokens or 0)
            self.metrics.generated_tokens.inc(self.tokens)
            self.metrics.finished.labels("cancelled").inc()

    def _usage(self) -> dict:
        u = self.finish.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def _failure(self) -> ApiError:
        ev = self.finish
        if ev.finish_reason == "cancelled":
            return ApiError(503, "the request was cancelled: the server is shutting down", code="cancelled")
        return ApiError(500, ev.error or _INTERNAL, code="generation_failed")

    async def _watch(self, receive) -> None:
        """Cancel the request as soon as the client disconnects (not at the next token sent)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.handle.cancel()
                return

    # -- one JSON answer
    async def complete(self, receive) -> Response:
        async def collect() -> str:
            parts = []
            async for ev in self.handle:
                if isinstance(ev, TokenEvent):
                    self._token(ev)
                    parts.append(ev.text)
                else:
                    self._finished(ev)
                    parts.append(ev.text)
            return "".join(parts)

        collector = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():  # the client is gone (or this task was cancelled)
                collector.cancel()
                self._abandoned()
        if collector.cancelled() or self.finish is None:
            return Response(status_code=499)  # nobody is listening
        text = collector.result()
        if self.finish.finish_reason not in ("stop", "length"):
            return self._failure().response()
        return JSONResponse({
            "id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": self.finish.finish_reason}],
            "usage": self._usage(),
        })

    # -- server-sent events
    def _chunk(self, delta: dict, finish_reason: str | None = None, usage: bool = False) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if usage:
            obj["usage"] = None  # as OpenAI: null on every chunk but the usage chunk
        return f"data: {_dumps(obj)}\n\n"

    async def sse(self, receive, include_usage: bool, continuous_usage: bool = False):
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            yield self._chunk({"role": "assistant", "content": ""}, usage=include_usage)
            n_tokens = 0
            async for ev in self.handle:
                if isinstance(ev, TokenEvent):
                    self._token(ev)
                    n_tokens += 1
                    if continuous_usage:
                        obj = json.loads(self._chunk({"content": ev.text})[6:])
                        p = self.info.prompt_tokens
                        obj["usage"] = {"prompt_tokens": p, "completion_tokens": n_tokens, "total_tokens": p + n_tokens}
                        yield f"data: {_dumps(obj)}\n\n"
                    elif ev.text:
                        yield self._chunk({"content": ev.text}, usage=include_usage)
                    continue
                self._finished(ev)
                if ev.text:
                    yield self._chunk({"content": ev.text}, usage=include_usage)
                if ev.finish_reason in ("stop", "length"):
                    yield self._chunk({}, ev.finish_reason, usage=include_usage)
                    if include_usage:
                        obj = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "choices": [], "usage": self._usage()}
                        yield f"data: {_dumps(obj)}\n\n"
                else:
                    yield f"data: {_dumps(self._failure().body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if self.finish is None:
                self._abandoned()
