"""OpenAI-compatible HTTP API over the engine: decode the request (validating every field by name), hand it to
the engine, encode its events as an OpenAI response or as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import re
import secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..chat import (ChatFormatError, ReasoningStream, ReplyStream, parse_assistant_reply, prompt_opens_thinking,
                    split_reasoning)
from ..generation.config import SamplingValueError, check_logit_bias, check_sampling_value
from .engine import Engine, Event, QueueFull, Request as EngineRequest, SamplingParams, default_max_tokens
from .metrics import ServingMetrics

# The largest request body accepted (413 beyond): vLLM's frontend default. --max-request-body-size changes it.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
MAX_JSON_DEPTH = 64  # deeper JSON is 400, before any handler walks it
# OpenAI's rule for function names; they are written into the prompt's markup (the role line), so nothing else.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")  # the OpenAI schema; others ignored


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> Response:
        # ASCII JSON: a message may quote what the client sent, lone surrogates included, and must still encode
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return Response(json.dumps(body), status_code=self.status, media_type="application/json")


# -- decoding requests ---------------------------------------------------------------------------------------
_MISSING = object()


def _get(body: dict, name: str, kinds: tuple, default: Any = _MISSING, check=None, why: str = "") -> Any:
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise ApiError(400, f"'{name}' is required", name, "missing_required_parameter")
        return default
    value = body[name]
    # JSON true/false are Python bools, which are also ints: accept them only where a bool is wanted.
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", name, "invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}'={value!r} is out of range: {why}", name, "invalid_value")
    return value


def _sampling(body: dict, name: str, field: str, default: Any) -> Any:
    """A decoding parameter checked against generate()'s declared range (generation.config.SAMPLING_BOUNDS):
    the same rule for the library, the command line and the server."""
    if body.get(name) is None:
        return default
    try:
        return check_sampling_value(field, body[name], name)
    except SamplingValueError as e:
        raise ApiError(400, str(e), name, "invalid_value") from None


# OpenAI fields glmtorch does not do, refused when set to anything but their no-op value rather than ignored:
# a client that asks for them must not get output made without them
NOT_SUPPORTED = {"best_of": (None, 1), "suffix": (None, "")}


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    if body.get("logit_bias") is None:
        return {}
    try:
        return check_logit_bias(body["logit_bias"], vocab)
    except SamplingValueError as e:
        raise ApiError(400, str(e), "logit_bias", "invalid_value") from None


def sampling_params(body: dict, vocab: int) -> tuple[SamplingParams, int | None, int]:
    """(params, max_tokens or None, n) from an OpenAI request body; `vocab`: the token ids logit_bias may name."""
    for name, no_op in NOT_SUPPORTED.items():
        if body.get(name, None) not in no_op:
            raise ApiError(400, f"'{name}' is not supported by this server (leave it out)", name,
                           "unsupported_parameter")
    max_tokens = _sampling(body, "max_completion_tokens", "max_new_tokens", None)
    if max_tokens is None:
        max_tokens = _sampling(body, "max_tokens", "max_new_tokens", None)
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and 0 < len(s) <= 1024 for s in stop) or len(stop) > 16:
        raise ApiError(400, "'stop' must be a non-empty string of at most 1024 characters or a list of up to 16 of "
                       "them", "stop", "invalid_value")
    logprobs = _get(body, "logprobs", (bool, int), False)
    top_logprobs = _get(body, "top_logprobs", (int,), 0)  # its range: SamplingParams.checked
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # /v1/completions: logprobs is a count
        if not 0 <= logprobs <= 20:
            raise ApiError(400, "'logprobs' must be in [0, 20]", "logprobs", "invalid_value")
        top_logprobs, logprobs = logprobs, True
    n = _get(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "must be in [1, 16]")
    _get(body, "user", (str,), None)  # OpenAI's end-user id: read by nothing here, but a string or a 400
    seed = _sampling(body, "seed", "seed", None)
    params = SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=_sampling(body, "temperature", "temperature", 1.0),
        top_p=_sampling(body, "top_p", "top_p", 1.0),
        top_k=_sampling(body, "top_k", "top_k", 0),
        min_p=_sampling(body, "min_p", "min_p", 0.0),
        repetition_penalty=_sampling(body, "repetition_penalty", "repetition_penalty", 1.0),
        presence_penalty=_sampling(body, "presence_penalty", "presence_penalty", 0.0),
        frequency_penalty=_sampling(body, "frequency_penalty", "frequency_penalty", 0.0),
        logit_bias=_logit_bias(body, vocab), min_tokens=_sampling(body, "min_tokens", "min_new_tokens", 0),
        seed=seed, stop=stop,
        logprobs=bool(logprobs), top_logprobs=top_logprobs,
        # vLLM's extension, which benchmarks send so that every request produces max_tokens
        ignore_eos=_get(body, "ignore_eos", (bool,), False), n=n,  # seed + n - 1 checked with the rest
    )
    return params, max_tokens, n


# vLLM's request fields for guided decoding (older names, then structured_outputs' keys) -> our constraint kinds
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}


def constraint_spec(body: dict, tools: list[dict] | None = None) -> tuple[dict | None, str | None]:
    """(the constraint a request asks for, the field that asked) from OpenAI's `response_format`, a required or
    named `tool_choice` (chat: the reply must be a call of an offered tool, its arguments valid for it), vLLM's
    `structured_outputs` {"json" | "regex" | "choice"} or its older `guided_json` / `guided_regex` /
    `guided_choice`. At most one; (None, None) for none."""
    asked = []
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("json_object", "json_schema"):
            raise ApiError(400, "'response_format' must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                           "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}", "response_format",
                           "invalid_value")
        asked.append(("response_format", response_format))
    choice = body.get("tool_choice")
    if tools and (choice == "required" or isinstance(choice, dict)):  # chat_tools checked that tools are given
        asked.append(("tool_choice", {"type": "tool_call", "tools": tools}))
    guided = {GUIDED_FIELDS[k]: body[k] for k in GUIDED_FIELDS if body.get(k) is not None}
    if body.get("structured_outputs") is not None:
        outputs = body["structured_outputs"]
        if not isinstance(outputs, dict):
            raise ApiError(400, "'structured_outputs' must be an object with one of 'json', 'regex', 'choice'",
                           "structured_outputs", "invalid_type")
        unknown = sorted(set(outputs) - {"json", "regex", "choice"})
        if unknown:
            raise ApiError(400, f"'structured_outputs' key(s) {unknown} are not supported; use 'json', 'regex' or "
                           "'choice'", "structured_outputs", "unsupported_value")
        guided.update({k: v for k, v in outputs.items() if v is not None})
    for kind, value in guided.items():
        field = "structured_outputs" if body.get("structured_outputs") is not None else \
            next(k for k, v in GUIDED_FIELDS.items() if v == kind)
        if kind == "json":
            if isinstance(value, str):  # vLLM takes the schema as a JSON string too
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise ApiError(400, f"'{field}' is a string that is not a JSON schema", field,
                                   "invalid_value") from None
            asked.append((field, {"type": "json_schema", "json_schema": {"name": "guided", "schema": value}}))
        else:
            asked.append((field, {"type": kind, kind: value}))
    if len(asked) > 1:
        raise ApiError(400, f"give one output constraint, not {len(asked)} ({', '.join(f for f, _ in asked)})",
                       asked[1][0], "invalid_value")
    return (asked[0][1], asked[0][0]) if asked else (None, None)


async def compile_request_constraint(served: "Served", spec: dict | None, field: str | None):
    """The compiled constraint (once per tokenizer and constraint, off the event loop), or a 400 naming what
    the grammar engine cannot enforce."""
    if spec is None:
        return None
    from ..generation.constrain import ConstraintError, compile_constraint

    try:
        return await served.off_loop(compile_constraint, served.tokenizer, spec, served.vocab_size,
                                     getattr(served.engine, "stop_ids", ()))
    except ConstraintError as e:
        raise ApiError(400, str(e), field, "invalid_value") from None


def stream_flags(body: dict) -> tuple[bool, str | None]:
    """(stream, usage): usage None, "final" (stream_options.include_usage: a last chunk with the usage) or "every"
    (with vLLM's continuous_usage_stats too: every chunk carries the usage so far; without include_usage it asks
    for nothing, as in vLLM). stream_options without stream is a 400, as OpenAI and vLLM answer it: a client asking
    for a usage chunk in a response that has no chunks has its request wrong."""
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options",
                       "invalid_value")
    for key, value in options.items():
        if key not in STREAM_OPTIONS:  # the key quoted cut short: it is the client's, of any length
            raise ApiError(400, f"'stream_options' has a key this server does not know, {key[:64]!r} (it knows "
                           f"{', '.join(STREAM_OPTIONS)})", "stream_options", "invalid_value")
        field = f"stream_options.{key}"
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, f"'{field}' must be a boolean", field, "invalid_type")
        if value and not STREAM_OPTIONS[key]:
            raise ApiError(400, f"'{field}' is not supported by this server (leave it out or set it false)", field,
                           "unsupported_parameter")
    if not options.get("include_usage"):
        return stream, None
    return stream, "every" if options.get("continuous_usage_stats") else "final"


# stream_options' keys (OpenAI's and vLLM's) -> whether this server does what `true` asks: a final usage chunk and
# vLLM's usage in every chunk, yes; OpenAI's padding of chunks against size side channels, no
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True, "include_obfuscation": False}


def chat_messages(body: dict) -> list[dict]:
    """The messages, each rebuilt from the OpenAI schema's fields only: a client's extra field (say `metadata`)
    never reaches the template, and every name that the template writes into markup is a plain identifier."""
    messages = _get(body, "messages", (list,))
    if not messages:
        raise ApiError(400, "'messages' must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"{where}.role={role!r} is not one of system, user, assistant, tool",
                           f"{where}.role", "invalid_value")
        message = {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if message["content"] is None and not message.get("tool_calls"):
            raise ApiError(400, f"{where}.content is required", f"{where}.content", "invalid_value")
        out.append(message)
    return out


def _content(content: Any, where: str) -> str | list | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content",
                       "invalid_type")
    for k, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ApiError(400, f"{where}.content[{k}] must be {{'type': 'text', 'text': '...'}} (only text parts are "
                           "supported)", f"{where}.content[{k}]", "invalid_value")
    return [{"type": "text", "text": part["text"]} for part in content]


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", where, "invalid_type")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name) or not isinstance(arguments, (str, dict)):
            raise ApiError(400, f"{where}[{k}] must be {{'type': 'function', 'function': {{'name': NAME, "
                           "'arguments': '...'}}}} with NAME of letters, digits, '_', '.', '-' (at most 64)",
                           f"{where}[{k}]", "invalid_value")
        out.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def chat_tools(body: dict) -> list[dict] | None:
    tools = _get(body, "tools", (list,), None)
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                           "'function': {'name': ...}}", "tool_choice", "invalid_value")
    elif choice not in ("auto", "required", "none"):
        raise ApiError(400, f"'tool_choice'={choice!r} must be 'none', 'auto', 'required' or a named function",
                       "tool_choice", "invalid_value")
    if not tools:
        if choice == "required" or isinstance(choice, dict):
            asked = "'required'" if choice == "required" else f"function {choice['function']['name']!r}"
            raise ApiError(400, f"'tool_choice' asks for {asked} but no 'tools' are given", "tool_choice",
                           "invalid_value")
        return None
    for i, t in enumerate(tools):
        function = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not FUNCTION_NAME.fullmatch(function["name"]):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': NAME, ...}}}} with "
                           "NAME of letters, digits, '_', '.', '-' (at most 64)", f"tools[{i}]", "invalid_value")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters", "invalid_type")
    if choice == "none":
        return None
    if isinstance(choice, dict):  # a named function: offer only that one
        name = choice["function"]["name"]
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise ApiError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice", "invalid_value")
    return tools


# what the renderer passes to every template itself: chat_template_kwargs may not replace them
RESERVED_TEMPLATE_ARGUMENTS = {"messages", "tools", "add_generation_prompt", "special_tokens", "eos_token", "pad_token",
                               "chat_template", "tokenize", "return_tensors", "return_dict"}


def chat_template_kwargs(body: dict) -> dict:
    """Extra variables for the chat template (vLLM's `chat_template_kwargs`, e.g. {"enable_thinking": false})."""
    kwargs = _get(body, "chat_template_kwargs", (dict,), None) or {}
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key in RESERVED_TEMPLATE_ARGUMENTS:
            raise ApiError(400, f"'chat_template_kwargs' key {key!r} is not a template variable a request may set",
                           "chat_template_kwargs", "invalid_value")
    return kwargs


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object, or ApiError 400 saying what is wrong with it: not UTF-8, not JSON (NaN
    and Infinity are not JSON), nested deeper than MAX_JSON_DEPTH, or a string holding a lone surrogate (valid
    JSON escapes, but no text: the tokenizer could not encode it). Runs off the event loop."""
    def constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", None,
                       "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels (at {path})", None,
                           "invalid_json")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str):  # the path names the field as sent, with undecodable characters escaped
                shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
                where = f"{path}.{shown}" if path else shown
            else:
                where = f"{path}[{key}]"
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ApiError(400, f"'{where}' holds a lone UTF-16 surrogate, which is not text", where,
                                       "invalid_value") from None
            if isinstance(item, (dict, list)):
                stack.append((item, where, depth + 1))
    return body


PROTECTED_PATHS = ("/v1/", "/tokenize", "/detokenize")  # /health, /metrics and the page stay open, as vLLM's


class RequireApiKey:
    """ASGI middleware: /v1/ (and tokenize / detokenize) answer 401 without `Authorization: Bearer KEY`. Plain
    ASGI rather than @app.middleware: that wrapper hides a client's disconnect from the handlers, which must cancel
    its work."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.strip().partition(" ")
            # the scheme is case-insensitive (RFC 9110); the key is compared in constant time
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("latin-1"), self.key):
                response = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None,
                                    "invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


ARRIVING_PATHS = ("/v1/completions", "/v1/chat/completions")
_arrival: contextvars.ContextVar[list | None] = contextvars.ContextVar("glmtorch_arrival", default=None)


class CountArrivals:
    """ASGI middleware: a generation request counts in `engine.arriving` from when its headers are read until it
    is about to be submitted (arrived(), from start()) or answered without being submitted (an error), so that an
    idle engine can let a burst come in before prefilling (Engine._let_arrivals_in)."""

    def __init__(self, app, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ARRIVING_PATHS:
            return await self.app(scope, receive, send)
        token = [self.engine]
        self.engine.arriving += 1
        reset = _arrival.set(token)
        try:
            await self.app(scope, receive, send)
        finally:
            _arrival.reset(reset)
            if token:  # answered without being submitted (an error): counted down here, the engine told
                token.pop().end_arrival()


def arrived() -> None:
    """This request (the one the current context counts) is no longer arriving: counted down once, just before it
    is submitted (whose submit() wakes an engine waiting for the last arrival)."""
    token = _arrival.get()
    if token:
        token.pop().arriving -= 1


# -- the app ---------------------------------------------------------------------------------------------------
@dataclass
class Served:
    """What every handler reads (app.state.served): the engine, the tokenizer, the served name, the limits, and the
    two worker threads that parse and tokenise off the event loop (a large body must not freeze /health or the
    streams; two, so that a flood waits its turn instead of adding threads)."""

    engine: Engine
    tokenizer: Any
    model_name: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    created: int = field(default_factory=lambda: int(time.time()))
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="glmtorch-requests"))
    metrics: Any = None  # ServingMetrics: GET /metrics

    async def off_loop(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(fn, *args, **kwargs))

    @property
    def vocab_size(self) -> int:
        """The model's logits' width (token ids a request may name), the tokenizer's size without a model."""
        model = getattr(self.engine, "model", None)
        return model.config.vocab_size if model is not None else self.tokenizer.vocab_size

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "glmtorch"}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}", "model",
                           "model_not_found")


class Inbox:
    """One response's (choice index, event) pairs as the Mailbox delivers them on its event loop: a list and at most
    one waiting reader, which takes everything there at once, without an asyncio.Queue's bookkeeping per item (its
    put, get and wake-up of getters): 2.85 us of the HTTP thread's CPU per event against 3.6 (64 streams, AMD EPYC)."""

    __slots__ = ("items", "reader")

    def __init__(self) -> None:
        self.items: list = []
        self.reader: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)

    async def take(self) -> list:
        """Everything delivered so far, waiting for at least one item."""
        while not self.items:
            self.reader = asyncio.get_running_loop().create_future()
            try:
                await self.reader
            finally:
                self.reader = None
        items, self.items = self.items, []
        return items


class Mailbox:
    """Events from the engine's thread to one event loop, with one wake-up per batch: a decode step of 64 streams
    posts 64 events, and `call_soon_threadsafe` for each wrote to the loop's wake-up pipe 64 times a step and
    took the GIL from the engine 64 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.pending = loop, threading.Lock(), []

    def post(self, inbox: Inbox, item) -> None:
        with self.lock:
            self.pending.append((inbox, item))
            first = len(self.pending) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed (shutdown): nobody is listening
                pass

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for inbox, item in pending:
            inbox.put(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mailbox() -> Mailbox:
    """The running event loop's mailbox."""
    loop = asyncio.get_running_loop()
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


router = APIRouter()


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="glmtorch", docs_url=None, redoc_url=None)
    app.state.served = served = Served(engine, tokenizer, model_name, max_body_bytes)
    served.metrics = ServingMetrics(engine, model_name)
    if hasattr(engine, "observer"):
        engine.observer = served.metrics
    app.router.on_shutdown.append(lambda: served.workers.shutdown(wait=False, cancel_futures=True))
    app.add_exception_handler(ApiError, api_error)
    if hasattr(engine, "arriving"):
        app.add_middleware(CountArrivals, engine=engine)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
    app.include_router(router)
    return app


# -- handlers ----------------------------------------------------------------------------------------------------
async def api_error(_: Request, e: ApiError) -> Response:  # async: a plain function would run on a worker thread
    return e.response()


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.served.engine
    return {"status": "ok", "active": engine.active, "waiting": len(engine.waiting)}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [request.app.state.served.model_card()]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request):
    served = request.app.state.served
    served.check_model(name)
    return served.model_card()


@router.get("/", response_class=HTMLResponse)
async def page():
    return resources.files("glmtorch.serve").joinpath("static/index.html").read_text(encoding="utf-8")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    served: Served = request.app.state.served
    body = await read_body(served, request)
    tools, ids, thinking = await chat_prompt(served, body)
    params, max_tokens, n = sampling_params(body, served.vocab_size)
    params.constraint = await compile_request_constraint(served, *constraint_spec(body, tools))
    stream, usage_mode = stream_flags(body)
    params.max_tokens = check_context(served, len(ids), max_tokens)
    inbox, requests = start(served, [ids], params)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": served.model_name}
    if stream:
        return StreamingResponse(stream_chat(inbox, requests, head, tools, usage_mode, len(ids), thinking),
                                 media_type="text/event-stream")
    results = await collect(inbox, requests, request)
    if results is None:
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    choices = []
    for i, r in enumerate(results):
        message, finish = assistant_message(r["text"], tools, r["finish_reason"], thinking)
        choice = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
        if params.logprobs:
            choice["logprobs"] = {"content": [chat_logprob(e) for e in r["logprobs"]]}
        choices.append(choice)
    completion = sum(r["completion_tokens"] for r in results)
    cached = cached_prompt_tokens([r["cached_tokens"] for r in results], n)
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(len(ids), completion, cached)}


@router.post("/v1/completions")
async def completions(request: Request):
    served: Served = request.app.state.served
    body = await read_body(served, request)
    prompt = _get(body, "prompt", (str, list))
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt", "invalid_value")
    params, max_tokens, n = sampling_params(body, served.vocab_size)
    if body.get("tool_choice") is not None:
        raise ApiError(400, "'tool_choice' belongs to /v1/chat/completions", "tool_choice", "invalid_value")
    params.constraint = await compile_request_constraint(served, *constraint_spec(body))
    if max_tokens is None:
        max_tokens = 16  # OpenAI's default for completions
    stream, usage_mode = stream_flags(body)
    echo = _get(body, "echo", (bool,), False)
    if echo and params.logprobs:
        raise ApiError(400, "'echo' with 'logprobs' is not supported (the prompt's log-probabilities are not "
                       "computed); drop one of them", "echo", "invalid_value")
    for prompt_text in prompts:
        check_text_length(served, [prompt_text])
    encoded = await served.off_loop(lambda: [served.tokenizer.encode(p) for p in prompts])
    if any(not ids for ids in encoded):
        raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
    for ids in encoded:
        params.max_tokens = check_context(served, len(ids), max_tokens)
    inbox, requests = start(served, encoded, params)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": served.model_name}
    prompt_tokens = sum(len(ids) for ids in encoded)
    echoed = [prompts[i // n] if echo else "" for i in range(len(requests))]  # choice i answers prompt i // n
    if stream:
        return StreamingResponse(stream_completion(inbox, requests, head, usage_mode, prompt_tokens, echoed, n),
                                 media_type="text/event-stream")
    results = await collect(inbox, requests, request)
    if results is None:
        return Response(status_code=499)
    choices = [{"index": i, "text": echoed[i] + r["text"], "finish_reason": r["finish_reason"],
                "logprobs": completion_logprobs(r["logprobs"]) if params.logprobs else None}
               for i, r in enumerate(results)]
    return {**head, "object": "text_completion", "choices": choices,
            "usage": usage(prompt_tokens, sum(r["completion_tokens"] for r in results),
                           cached_prompt_tokens([r["cached_tokens"] for r in results], n))}


@router.post("/tokenize")
async def tokenize(request: Request):
    """vLLM's /tokenize: {"prompt": text} or {"messages": [...]} (rendered as a chat with the reply's opening) ->
    {"count", "max_model_len", "tokens"}."""
    served: Served = request.app.state.served
    body = await read_body(served, request)
    if "messages" in body:
        _, ids, _ = await chat_prompt(served, body)
    else:
        prompt = _get(body, "prompt", (str,))
        check_text_length(served, [prompt])
        ids = await served.off_loop(served.tokenizer.encode, prompt)
    return {"count": len(ids), "max_model_len": served.engine.context, "tokens": list(ids)}


@router.post("/detokenize")
async def detokenize(request: Request):
    """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
    served: Served = request.app.state.served
    body = await read_body(served, request)
    tokens = _get(body, "tokens", (list,))
    vocab = served.engine.model.config.vocab_size
    if len(tokens) > served.engine.context or not all(
            type(t) is int and 0 <= t < vocab for t in tokens):  # bool is an int subclass: type(), not isinstance
        raise ApiError(400, f"'tokens' must be at most {served.engine.context} integers in [0, {vocab})", "tokens",
                       "invalid_value")
    return {"prompt": await served.off_loop(served.tokenizer.decode, tokens)}


@router.get("/metrics")
async def metrics(request: Request):
    served: Served = request.app.state.served
    return Response(served.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- what the handlers share ---------------------------------------------------------------------------------------
async def chat_prompt(served: Served, body: dict) -> tuple[list[dict] | None, list[int], bool]:
    """(tools, prompt ids, whether the prompt opened the reply's thinking) of a chat request: its messages and
    tools checked, sized, and rendered through the model's chat template (off the event loop)."""
    messages, tools, extra = chat_messages(body), chat_tools(body), chat_template_kwargs(body)
    check_text_length(served, [p["text"] if isinstance(p, dict) else p for m in messages
                               for p in (m["content"] if isinstance(m["content"], list) else [m["content"] or ""])]
                      + [json.dumps(tools or [], ensure_ascii=False)])
    try:
        ids = await served.off_loop(served.tokenizer.apply_chat_template, messages, tools=tools,
                                    add_generation_prompt=True, **extra)
    except ChatFormatError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    return tools, ids, prompt_opens_thinking(served.tokenizer.decode(ids[-8:]))


async def read_body(served: Served, request: Request) -> dict:
    # JSON only: a page on another site can send text/plain or a form without asking the browser first
    # (no CORS preflight), so accepting those would let any web page drive a server without --api-key.
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"the request body must be sent as Content-Type: application/json (got "
                       f"{kind or 'none'!r})", None, "unsupported_media_type")
    limit = served.max_body_bytes
    too_large = ApiError(413, f"the request body is larger than this server accepts ({limit} bytes; "
                         "--max-request-body-size)", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a missing or false Content-Length is no way round
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = await served.off_loop(parse_body, b"".join(chunks))
    name = _get(body, "model", (str,), None)
    if name is not None:
        served.check_model(name)
    return body


def check_text_length(served: Served, texts: list[str]) -> None:
    """Turn away text that cannot fit the context before tokenising it: n bytes are at least
    n / max_token_bytes tokens."""
    context = served.engine.context
    least = sum(len(t.encode("utf-8")) for t in texts) // served.tokenizer.max_token_bytes
    if least >= context:
        raise ApiError(400, f"this model's context is {context} tokens; the prompt is at least {least}. "
                       "Shorten the prompt", "messages", "context_length_exceeded")


def check_context(served: Served, prompt_tokens: int, max_tokens: int | None) -> int:
    engine = served.engine
    if max_tokens is None:
        max_tokens = default_max_tokens(engine, prompt_tokens)
    if prompt_tokens + max_tokens > engine.context:
        raise ApiError(400, f"this model's context is {engine.context} tokens; the prompt has {prompt_tokens} and "
                       f"max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens",
                       "max_tokens", "context_length_exceeded")
    return max_tokens


def start(served: Served, prompts: list[list[int]], params: SamplingParams) -> tuple[Inbox, list[EngineRequest]]:
    """Submit params.n requests per prompt (choice i seeded seed + i); their events arrive in one inbox as (choice
    index, event)."""
    n = params.n
    box = mailbox()
    inbox = Inbox()
    requests = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            def emit(event: Event, index=index):
                box.post(inbox, (index, event))

            requests.append(EngineRequest(list(ids), params.for_choice(i), emit))
    arrived()  # before submitting: an idle engine must not wait for the request it is being handed
    try:
        for r in requests:
            served.engine.submit(r)
    except BaseException as e:  # all of a request's choices run, or none: no orphan decodes for nobody
        for r in requests:
            r.cancelled.set()
        if isinstance(e, QueueFull):
            raise ApiError(503, f"the server is busy: {e}; retry later", None, "queue_full", "server_error") from None
        if isinstance(e, SamplingValueError):  # the rules every request meets (SamplingParams.checked: min_tokens
            raise ApiError(400, str(e), e.field, "invalid_value") from None  # against the final max_tokens, ...)
        raise
    return inbox, requests


async def collect(inbox: Inbox, requests, http: Request) -> list[dict] | None:
    """Every choice's text and numbers, or None when the client went away first (its sequences are cancelled
    at once: a non-streaming client that hangs up must not leave its work decoding for nobody)."""
    results = [{"text": "", "finish_reason": None, "logprobs": [], "completion_tokens": 0, "prompt_tokens": 0,
                "cached_tokens": 0}
               for _ in requests]

    async def watch() -> None:  # a blocking receive, the one way to hear a hang-up while nothing is sent
        while (await http.receive())["type"] != "http.disconnect":
            pass
        inbox.put((None, None))

    watcher = asyncio.create_task(watch())
    done = 0
    try:
        while done < len(requests):
            for index, event in await inbox.take():
                if event is None:
                    return None
                r = results[index]
                if event.kind == "error":
                    raise ApiError(500, event.error, None, "server_error", "server_error")
                r["text"] += event.text
                r["logprobs"] += event.token_logprobs
                if event.kind == "done":
                    r.update(finish_reason=event.finish_reason, completion_tokens=event.completion_tokens,
                             cached_tokens=event.cached_tokens,
                             prompt_tokens=event.prompt_tokens)
                    done += 1
    finally:
        watcher.cancel()
        for request in requests:
            request.cancelled.set()  # a no-op for finished ones; frees the slots of a dropped client
    return results


async def next_event(inbox: Inbox, backlog: list) -> tuple:
    """The next (choice index, event) of a stream, with the events that piled up behind it merged: when the engine
    runs ahead of this stream's writes (a burst of 64 streams on 2 cores), each choice's consecutive text events
    become one (their texts and log-probabilities joined; a final event takes the text before it), so a response
    writes one chunk per choice per turn of the event loop, not one per token. Order within a choice is kept;
    clients see the same text in fewer, larger deltas, as OpenAI's own streams send them. (An event is this
    stream's alone once posted: the later one of a pair takes the earlier one's text in place.)"""
    if not backlog:
        latest: dict = {}  # choice index -> position in backlog of its latest event
        for index, event in await inbox.take():
            at = latest.get(index)
            if (at is not None and event is not None and event.kind in ("text", "done")
                    and backlog[at][1].kind == "text"):
                before = backlog[at][1]
                event.text = before.text + event.text
                if before.token_logprobs:
                    event.token_logprobs = before.token_logprobs + event.token_logprobs
                backlog[at] = (index, event)
            else:
                latest[index] = len(backlog)
                backlog.append((index, event))
        backlog.reverse()  # popped from the end
    return backlog.pop()


async def stream_chat(inbox: Inbox, requests, head: dict, tools, usage_mode: str | None, prompt_tokens: int,
                      thinking: bool = False):
    chunks = ChunkFormat(head, "chat.completion.chunk")
    tally = UsageTally(len(requests), prompt_tokens)

    def chunk(index, delta, finish=None, logprobs=None):
        if usage_mode == "every":
            return chunks.whole({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs},
                                tally.so_far(max))
        if finish is None and logprobs is None and len(delta) == 1 and type(delta.get("content")) is str:
            return chunks.piece(index, delta["content"])
        return chunks.whole({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})

    replies = [ReplyStream(tools) for _ in requests]
    backlog = []
    thoughts = [ReasoningStream(thinking) for _ in requests]  # the thinking comes off first, as reasoning_content
    done = 0
    try:
        for i in range(len(requests)):
            yield chunk(i, {"role": "assistant", "content": ""})
        while done < len(requests):
            index, event = await next_event(inbox, backlog)
            if event.kind == "error":
                yield sse_error(event.error)
                break
            tally.note(index, event)
            lp = {"content": [chat_logprob(e) for e in event.token_logprobs]} if event.token_logprobs else None
            thought, answer = thoughts[index].feed(event.text)
            if event.kind == "done":  # the reply is over: what was held for a possible tag is text after all
                more_thought, more_answer = thoughts[index].finish()
                thought, answer = thought + more_thought, answer + more_answer
            if thought:
                yield chunk(index, {"reasoning_content": thought}, logprobs=lp)
                lp = None
            piece = replies[index].feed(answer)
            if piece or (lp and replies[index].mode == "content"):
                yield chunk(index, {"content": piece}, logprobs=lp)
            if event.kind == "done":
                done += 1
                finish = event.finish_reason
                held = replies[index].held_back()
                if held is not None:
                    message, finish = assistant_message(held, tools, finish)
                    if message.get("tool_calls"):
                        calls = [{**c, "index": k} for k, c in enumerate(message["tool_calls"])]
                        yield chunk(index, {"tool_calls": calls})
                    elif message["content"]:
                        yield chunk(index, {"content": message["content"]})
                yield chunk(index, {}, finish)
        if usage_mode:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": tally.so_far(max)})
        yield "data: [DONE]\n\n"
    finally:
        for r in requests:
            r.cancelled.set()


async def stream_completion(inbox: Inbox, requests, head: dict, usage_mode: str | None, prompt_tokens: int,
                            echoed, n: int = 1):
    chunks = ChunkFormat(head, "text_completion")
    tally = UsageTally(len(requests), prompt_tokens)

    def cached(per_choice: list[int]) -> int:
        return cached_prompt_tokens(per_choice, n)

    def chunk(index, text, finish=None, logprobs=None):
        if usage_mode == "every":
            return chunks.whole({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs},
                                tally.so_far(cached))
        if finish is None and logprobs is None:
            return chunks.piece(index, text)
        return chunks.whole({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})

    done = 0
    backlog = []
    try:
        for index, text in enumerate(echoed):
            if text:
                yield chunk(index, text)
        while done < len(requests):
            index, event = await next_event(inbox, backlog)
            if event.kind == "error":
                yield sse_error(event.error)
                break
            tally.note(index, event)
            if event.text or event.token_logprobs:
                lp = completion_logprobs(event.token_logprobs) if event.token_logprobs else None
                yield chunk(index, event.text, logprobs=lp)
            if event.kind == "done":
                done += 1
                yield chunk(index, "", event.finish_reason)
        if usage_mode:
            yield sse({**head, "object": "text_completion", "choices": [], "usage": tally.so_far(cached)})
        yield "data: [DONE]\n\n"
    finally:
        for r in requests:
            r.cancelled.set()


# -- encoding responses ----------------------------------------------------------------------------------------
def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ChunkFormat:
    """The events of one streamed response: `whole(choice)` is sse() of the chunk; `piece(...)`, the one sent for
    nearly every token (a choice's new text, no finish reason, no log-probabilities), is the same bytes from a
    beginning rendered once and the text's own JSON: 1.7 us instead of the 6.8 that json.dumps of the whole chunk
    took, once per token of every stream."""

    def __init__(self, head: dict, kind: str) -> None:
        self.head = {**head, "object": kind}
        opening = json.dumps({**self.head, "choices": [{"index": 0}]}, ensure_ascii=False)
        assert opening.endswith('"choices": [{"index": 0}]}')
        self.opening = "data: " + opening[:-len("0}]}")]  # ... "choices": [{"index":<space>
        # where a choice's text goes: a completion's "text", a chat chunk's delta {"content": ...}
        chat = kind == "chat.completion.chunk"
        self.before, self.after = (', "delta": {"content": ', "}") if chat else (', "text": ', "")

    def whole(self, choice: dict, usage: dict | None = None) -> str:
        return sse({**self.head, "choices": [choice], **({"usage": usage} if usage else {})})

    def piece(self, index: int, text: str) -> str:
        return (f'{self.opening}{index}{self.before}{json.dumps(text, ensure_ascii=False)}{self.after}, '
                '"finish_reason": null, "logprobs": null}]}\n\n')


def sse_error(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "server_error"}})


def cached_prompt_tokens(per_choice: list[int], n: int) -> int:
    """Prompt tokens the prefix cache supplied, each prompt counted once (its n choices are n requests)."""
    return sum(max(per_choice[p:p + n]) for p in range(0, len(per_choice), n))


class UsageTally:
    """A streamed response's usage as its events arrive: each choice's tokens generated so far and prompt tokens
    from the prefix cache (every event carries its request's counts so far; merged events, the latest)."""

    def __init__(self, choices: int, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.generated, self.cached = [0] * choices, [0] * choices

    def note(self, index: int, event: Event) -> None:
        self.generated[index], self.cached[index] = event.completion_tokens, event.cached_tokens

    def so_far(self, cached_of) -> dict:
        """usage() of the tokens so far; `cached_of` counts the choices' cached tokens (max: one prompt shared by the
        choices; cached_prompt_tokens: n choices per prompt)."""
        return usage(self.prompt_tokens, sum(self.generated), cached_of(self.cached))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage block; prompt_tokens_details.cached_tokens: prompt tokens the prefix cache supplied."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def assistant_message(text: str, tools: list[dict] | None, finish: str | None,
                      thinking: bool = False) -> tuple[dict, str | None]:
    """A finished reply as an OpenAI message: a tool call when the reply is one of the offered tools with valid
    JSON arguments, else plain content; a reasoning model's thinking in `reasoning_content` beside either (as vLLM
    and DeepSeek's API give it). `thinking`: the prompt opened the reply's <think>."""
    reasoning, answer = split_reasoning(text, thinking)
    message: dict = {"role": "assistant"}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tools:
        reply = parse_assistant_reply(text, tools, thinking)
        if reply.tool_calls:
            calls = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": c.name, "arguments": c.arguments_json}} for c in reply.tool_calls]
            return {**message, "content": None, "tool_calls": calls}, "tool_calls"
    if reasoning is None:
        answer = answer[1:] if answer.startswith("\n") else answer
    return {**message, "content": answer}, finish


def chat_logprob(entry: dict) -> dict:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode()),
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())}
                             for t in entry.get("top_logprobs", [])]}


def completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": []}
