"""OpenAI-compatible HTTP API over the engine: decode the request (validating every field by name), hand it to
the engine, encode its events as an OpenAI response or as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..chat import ChatFormatError, parse_assistant_reply
from .engine import Engine, Event, QueueFull, Request as EngineRequest, SamplingParams, default_max_tokens


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


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


def sampling_params(body: dict) -> tuple[SamplingParams, int | None, int]:
    """(params, max_tokens or None, n) from an OpenAI request body."""
    num = (int, float)
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "must be >= 1")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), None, lambda v: v >= 1, "must be >= 1")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 16 of them", "stop", "invalid_value")
    logprobs = _get(body, "logprobs", (bool, int), False)
    top_logprobs = _get(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "must be in [0, 20]")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # /v1/completions: logprobs is a count
        if not 0 <= logprobs <= 20:
            raise ApiError(400, "'logprobs' must be in [0, 20]", "logprobs", "invalid_value")
        top_logprobs, logprobs = logprobs, True
    params = SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=float(_get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")),
        top_p=float(_get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        top_k=_get(body, "top_k", (int,), 0, lambda v: v >= 0, "must be >= 0"),
        min_p=float(_get(body, "min_p", num, 0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")),
        repetition_penalty=float(_get(body, "repetition_penalty", num, 1.0, lambda v: 0 < v <= 10,
                                      "must be in (0, 10]")),
        seed=_get(body, "seed", (int,), None, lambda v: v >= 0, "must be >= 0"),
        stop=stop, logprobs=bool(logprobs), top_logprobs=top_logprobs,
        # vLLM's extension, which benchmarks send so that every request produces max_tokens
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
    )
    n = _get(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "must be in [1, 16]")
    return params, max_tokens, n


def chat_messages(body: dict) -> list[dict]:
    messages = _get(body, "messages", (list,))
    if not messages:
        raise ApiError(400, "'messages' must not be empty", "messages", "invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        if m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"messages[{i}].role={m.get('role')!r} is not one of system, user, assistant, tool",
                           f"messages[{i}].role", "invalid_value")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content", "invalid_type")
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ApiError(400, f"messages[{i}].content is required", f"messages[{i}].content", "invalid_value")
    return [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]


def chat_tools(body: dict) -> list[dict] | None:
    tools = _get(body, "tools", (list,), None)
    if not tools:
        return None
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict) \
                or not isinstance(t["function"].get("name"), str):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           f"tools[{i}]", "invalid_value")
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if isinstance(choice, dict):  # a named function: offer only that one
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise ApiError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice", "invalid_value")
    elif choice not in ("auto", "required"):
        raise ApiError(400, f"tool_choice={choice!r} must be 'none', 'auto', 'required' or a named function",
                       "tool_choice", "invalid_value")
    return tools


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="glmtorch", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return e.response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None,
                                "invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "glmtorch"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("glmtorch.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def usage_chunk(kind: str, rid: str, now: int, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk of a stream with stream_options.include_usage: no choices, the token counts."""
        return sse({"id": rid, "object": kind, "created": now, "model": model_name, "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        name = body.get("model")
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
        return body

    def check_context(prompt_tokens: int, max_tokens: int | None) -> int:
        if max_tokens is None:
            max_tokens = default_max_tokens(engine, prompt_tokens)
        if prompt_tokens + max_tokens > engine.context:
            raise ApiError(400, f"this model's context is {engine.context} tokens; the prompt has {prompt_tokens} and "
                           f"max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens",
                           "max_tokens", "context_length_exceeded")
        return max_tokens

    def start(prompts: list[list[int]], params: SamplingParams, n: int) -> tuple[asyncio.Queue, list[EngineRequest]]:
        """Submit n requests per prompt; their events arrive on one queue as (choice index, event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                seeded = params if params.seed is None or i == 0 else \
                    SamplingParams(**{**params.__dict__, "seed": params.seed + i})

                def emit(event: Event, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))

                requests.append(EngineRequest(list(ids), seeded, emit))
        try:
            for r in requests:
                engine.submit(r)
        except QueueFull as e:
            for r in requests:
                r.cancelled.set()
            raise ApiError(503, f"the server is busy: {e}; retry later", None, "queue_full", "server_error") from None
        return queue, requests

    async def collect(queue, requests) -> list[dict]:
        results = [{"text": "", "finish_reason": None, "logprobs": [], "completion_tokens": 0, "prompt_tokens": 0}
                   for _ in requests]
        done = 0
        try:
            while done < len(requests):
                index, event = await queue.get()
                r = results[index]
                if event.kind == "error":
                    raise ApiError(500, event.error, None, "server_error", "server_error")
                r["text"] += event.text
                r["logprobs"] += event.token_logprobs
                if event.kind == "done":
                    r.update(finish_reason=event.finish_reason, completion_tokens=event.completion_tokens,
                             prompt_tokens=event.prompt_tokens)
                    done += 1
        finally:
            for request in requests:
                request.cancelled.set()  # a no-op for finished ones; frees the slots of a dropped client
        return results

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages, tools = chat_messages(body), chat_tools(body)
        params, max_tokens, n = sampling_params(body)
        stream = _get(body, "stream", (bool,), False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except ChatFormatError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        params.max_tokens = check_context(len(ids), max_tokens)
        queue, requests = start([ids], params, n)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if stream:
            return StreamingResponse(stream_chat(queue, requests, rid, now, tools, include_usage, len(ids)),
                                     media_type="text/event-stream")
        results = await collect(queue, requests)
        choices = []
        for i, r in enumerate(results):
            message, finish = assistant_message(r["text"], tools, r["finish_reason"])
            choice = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            if params.logprobs:
                choice["logprobs"] = {"content": [chat_logprob(e) for e in r["logprobs"]]}
            choices.append(choice)
        completion = sum(r["completion_tokens"] for r in results)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage(len(ids), completion)}

    async def stream_chat(queue, requests, rid, now, tools, include_usage, prompt_tokens):
        def chunk(index, delta, finish=None, logprobs=None):
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [choice]})

        states = [{"mode": "undecided" if tools else "content", "buffer": "", "started": False} for _ in requests]
        completion, done = 0, 0
        try:
            for i in range(len(requests)):
                yield chunk(i, {"role": "assistant", "content": ""})
            while done < len(requests):
                index, event = await queue.get()
                st = states[index]
                if event.kind == "error":
                    yield sse_error(event.error)
                    break
                lp = {"content": [chat_logprob(e) for e in event.token_logprobs]} if event.token_logprobs else None
                piece = event.text
                if st["mode"] == "undecided":  # with tools: the first line tells a call from an answer
                    st["buffer"] += piece
                    piece = ""
                    if "\n" in st["buffer"]:
                        head = st["buffer"].split("\n", 1)[0]
                        if head.strip():
                            st["mode"] = "call"
                        else:
                            st["mode"], piece, st["buffer"] = "content", st["buffer"], ""
                elif st["mode"] == "call":
                    st["buffer"] += piece
                    piece = ""
                if st["mode"] == "content" and piece:
                    if not st["started"]:
                        piece = piece.lstrip("\n")  # GLM-4 opens an answer with a newline
                        st["started"] = bool(piece)
                    if piece or lp:
                        yield chunk(index, {"content": piece}, logprobs=lp)
                if event.kind == "done":
                    done += 1
                    completion += event.completion_tokens
                    finish = event.finish_reason
                    if st["mode"] != "content":
                        message, finish = assistant_message(st["buffer"], tools, finish)
                        if message.get("tool_calls"):
                            calls = [{**c, "index": k} for k, c in enumerate(message["tool_calls"])]
                            yield chunk(index, {"tool_calls": calls})
                        elif message["content"]:
                            yield chunk(index, {"content": message["content"]})
                    yield chunk(index, {}, finish)
            if include_usage:
                yield usage_chunk("chat.completion.chunk", rid, now, prompt_tokens, completion)
            yield "data: [DONE]\n\n"
        finally:
            for r in requests:
                r.cancelled.set()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = _get(body, "prompt", (str, list))
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt", "invalid_value")
        params, max_tokens, n = sampling_params(body)
        if max_tokens is None:
            max_tokens = 16  # OpenAI's default for completions
        stream = _get(body, "stream", (bool,), False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        encoded = [tokenizer.encode(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
        for ids in encoded:
            params.max_tokens = check_context(len(ids), max_tokens)
        queue, requests = start(encoded, params, n)
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        prompt_tokens = sum(len(ids) for ids in encoded)
        if stream:
            return StreamingResponse(stream_completion(queue, requests, rid, now, include_usage, prompt_tokens),
                                     media_type="text/event-stream")
        results = await collect(queue, requests)
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                    "logprobs": completion_logprobs(r["logprobs"]) if params.logprobs else None}
                   for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage(prompt_tokens, sum(r["completion_tokens"] for r in results))}

    async def stream_completion(queue, requests, rid, now, include_usage, prompt_tokens):
        def chunk(index, text, finish=None, logprobs=None):
            return sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]})

        completion, done = 0, 0
        try:
            while done < len(requests):
                index, event = await queue.get()
                if event.kind == "error":
                    yield sse_error(event.error)
                    break
                if event.text or event.token_logprobs:
                    lp = completion_logprobs(event.token_logprobs) if event.token_logprobs else None
                    yield chunk(index, event.text, logprobs=lp)
                if event.kind == "done":
                    done += 1
                    completion += event.completion_tokens
                    yield chunk(index, "", event.finish_reason)
            if include_usage:
                yield usage_chunk("text_completion", rid, now, prompt_tokens, completion)
            yield "data: [DONE]\n\n"
        finally:
            for r in requests:
                r.cancelled.set()

    return app


# -- encoding responses ----------------------------------------------------------------------------------------
def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "server_error"}})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def assistant_message(text: str, tools: list[dict] | None, finish: str | None) -> tuple[dict, str | None]:
    """A finished reply as an OpenAI message: a tool call when the reply is one of the offered tools with valid
    JSON arguments, else plain content."""
    if tools:
        reply = parse_assistant_reply(text, tools)
        if reply.tool_calls:
            calls = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": c.name, "arguments": c.arguments_json}} for c in reply.tool_calls]
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    content = text[1:] if text.startswith("\n") else text
    return {"role": "assistant", "content": content}, finish


def chat_logprob(entry: dict) -> dict:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode()),
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())}
                             for t in entry.get("top_logprobs", [])]}


def completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": []}
