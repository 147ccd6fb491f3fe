"""Chat templates and GLM-4 function calling.

Templates render in jinja2's immutable sandbox (a checkpoint's template is untrusted input). Messages are
normalised first: OpenAI `tool` messages become GLM's `observation` turns, content given as a list of text
parts is joined, and an assistant message with OpenAI `tool_calls` becomes GLM-4's own form, the function
name on the role line and the JSON arguments below it:

    <|assistant|>get_weather
    {"city": "Paris"}

`parse_assistant_reply` turns a generated reply back into plain content or a tool call, and separates the thinking
of a reasoning model (GLM-Z1: "<think>...</think>" before the answer, its opening tag often written by the prompt,
not generated) from the answer; `ReasoningStream` and `ReplyStream` do the same for a reply as it streams in.
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any

ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation", "function": "observation"}


class ChatFormatError(ValueError):
    """A conversation the chat template cannot render."""


def default_chat_template(family: str = "glm4") -> str:
    """The built-in template of a family, used when a checkpoint ships none: "glm4" (GLM-4-9B-chat), "glm4_0414"
    (GLM-4-0414), "glmz1" (GLM-Z1-0414, replies opened inside <think>), "chatglm3" (ChatGLM2/3)."""
    return resources.files("glmtorch").joinpath(f"templates/{family}_chat.jinja").read_text(encoding="utf-8")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatFormatError(f"messages[{i}] must be a dict with a 'role'")
        role = ROLE_ALIASES.get(message["role"], message["role"])
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}] has role {message['role']!r}; expected one of "
                                  "system, user, assistant, tool (observation)")
        content = _text(message.get("content"), i)
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            if content:
                out.append({**message, "role": role, "content": content, "metadata": ""})
            for call in calls:
                function = call.get("function", call)
                arguments = function.get("arguments", {})
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                out.append({"role": "assistant", "content": arguments, "metadata": function["name"]})
            continue
        out.append({**message, "role": role, "content": content, "metadata": message.get("metadata") or ""})
    return out


def _text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(part.get("text", ""))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ChatFormatError(f"messages[{index}].content has a part glmtorch cannot render: {part!r} "
                                      "(only text parts are supported)")
        return "".join(parts)
    raise ChatFormatError(f"messages[{index}].content must be a string or a list of text parts")


def render_chat(template: str, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                add_generation_prompt: bool = False, special_tokens: tuple[str, ...] = (), **extra: Any) -> str:
    """The conversation as text. `special_tokens`: control tokens that JSON written by the template (tools)
    must not spell, so a tool's description cannot open a turn (their first character is \\u-escaped)."""
    return _render(template, normalize_messages(messages), tools, add_generation_prompt, special_tokens, extra)


def render_chat_spans(template: str, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                      add_generation_prompt: bool = False, special_tokens: tuple[str, ...] = (),
                      **extra: Any) -> tuple[str, list[tuple[int, int]] | None]:
    """(text, where each message's content lies in it), so that content can be tokenised as plain text: a user
    who types `<|assistant|>` gets those characters, not the control token. The spans come from a second
    rendering with each content wrapped in markers nobody can type (a fresh nonce); they are trusted only when
    removing the markers gives back exactly the plain rendering (else None: the template inspected or rewrote the
    content, and the caller falls back to `defuse`)."""
    normalized = normalize_messages(messages)
    text = _render(template, normalized, tools, add_generation_prompt, special_tokens, extra)
    nonce = secrets.token_hex(8)
    marked = [{**m, "content": f"\x02{nonce}{m['content']}\x03{nonce}"} if m["content"] else m for m in normalized]
    try:
        with_markers = _render(template, marked, tools, add_generation_prompt, special_tokens, extra)
    except ChatFormatError:
        return text, None
    spans, out, position = [], [], 0
    for match in re.finditer(f"\x02{nonce}(.*?)\x03{nonce}", with_markers, flags=re.S):
        out.append(with_markers[position:match.start()])
        start = sum(map(len, out))
        out.append(match.group(1))
        spans.append((start, start + len(match.group(1))))
        position = match.end()
    out.append(with_markers[position:])
    if "".join(out) != text or nonce in text:
        return text, None
    return text, spans


def defuse(messages: list[dict[str, Any]], special_tokens: tuple[str, ...]) -> list[dict[str, Any]]:
    """Messages whose content cannot spell a control token (a zero-width space after each one's first
    character): the fallback for templates whose content spans cannot be traced."""
    def fix(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        for token in special_tokens:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{**p, "text": fix(p.get("text"))} if isinstance(p, dict) else fix(p) for p in content]
        out.append({**m, "content": fix(content)})
    return out


# A checkpoint's template is untrusted code: besides the sandbox (no attribute escapes), it gets a budget. Real
# templates are a few KB, render in milliseconds and loop over the messages; these limits are far above that.
MAX_TEMPLATE_CHARS = 256 * 1024
MAX_RENDER_SECONDS = 5.0
RANGE_BUDGET = 1_000_000  # elements all range() calls of one rendering may produce together
MAX_PRODUCT_ITEMS = 1_000_000  # 'x' * n, [..] * n


def _render(template: str, normalized: list[dict[str, Any]], tools, add_generation_prompt: bool,
            special_tokens: tuple[str, ...], extra: dict[str, Any]) -> str:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatFormatError(f"the chat template is {len(template)} characters, more than the {MAX_TEMPLATE_CHARS} "
                              "glmtorch renders; it is not a chat template")
    # the output may be as long as the conversation plus a generous allowance for markup
    text_size = sum(len(str(m.get("content") or "")) for m in normalized) + len(json.dumps(tools or [], default=str))
    limit = 2 * text_size + 1_000_000
    budget = _budget.set({"range": RANGE_BUDGET})
    start, size, parts = time.monotonic(), 0, []
    try:
        for part in _compile(template, tuple(special_tokens)).generate(
                messages=normalized, tools=tools or None, add_generation_prompt=add_generation_prompt, **extra):
            parts.append(part)
            size += len(part)
            if size > limit or time.monotonic() - start > MAX_RENDER_SECONDS:
                raise ChatFormatError(f"the chat template's output grew past {limit} characters or "
                                      f"{MAX_RENDER_SECONDS:.0f} s; it is not rendering a conversation")
        return "".join(parts)
    except ChatFormatError:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in the template, sandbox violations, budgets
        raise ChatFormatError(f"the chat template failed to render: {e}") from None
    finally:
        _budget.reset(budget)


_budget: contextvars.ContextVar[dict] = contextvars.ContextVar("glmtorch_template_budget")


@lru_cache(maxsize=16)
def _compile(template: str, special_tokens: tuple[str, ...] = ()):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
        text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)
        for token in special_tokens:  # inside JSON strings only, where \\uXXXX means the same character
            if token in text:
                text = text.replace(token, f"\\u{ord(token[0]):04x}" + token[1:])
        return text

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, with `*` and `**` checked: "x" * 10**9 or 10 ** 10**8 would take the memory or the CPU."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
                raise TemplateError(f"exponent {right} is too large for a chat template")
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                            and len(seq) * count > MAX_PRODUCT_ITEMS:
                        raise TemplateError("a repetition in the chat template is too large")
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args):
        r = range(*args)
        budget = _budget.get({"range": RANGE_BUDGET})
        budget["range"] -= len(r)
        if budget["range"] < 0:
            raise TemplateError(f"the chat template iterates over more than {RANGE_BUDGET} numbers")
        return r

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["range"] = bounded_range
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class AssistantReply:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None  # why a reply that looked like a tool call was kept as plain content
    reasoning_content: str | None = None  # a reasoning model's thinking (None: the reply did not think)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves the reply inside an open <think> (GLM-Z1's generation prompt ends
    "<|assistant|>\\n<think>"), so that the reply starts with thinking though it never writes the opening tag."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def split_reasoning(text: str, thinking: bool = False) -> tuple[str | None, str]:
    """(thinking, answer) of a reply: `thinking` says the prompt opened the <think> already; else a reply that
    opens it itself counts too. A reply cut inside its thinking is all thinking and no answer. (None, text) for a
    reply that does not think."""
    if not thinking:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        text = stripped[len(THINK_OPEN):]
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    return reasoning.strip(), answer.lstrip() if closed else ""


def _offered_names(tools: list[dict] | None) -> set:
    return {(t.get("function", t) or {}).get("name") for t in tools or []}


def parse_assistant_reply(text: str, tools: list[dict] | None = None, thinking: bool = False) -> AssistantReply:
    """GLM-4 answers with "\\ncontent" or, to call a function, "name\\n{json arguments}"; a reasoning model
    (GLM-Z1) thinks first, "<think>...</think>", and its thinking comes back in `reasoning_content` (`thinking`:
    the prompt ended inside an open <think>, see prompt_opens_thinking).

    With `tools`, a name that is not among them means plain content. Malformed JSON is reported in `error`
    and the reply kept as content; this never raises.
    """
    reasoning, text = split_reasoning(text, thinking)
    offered = _offered_names(tools)
    if reasoning is not None and text.partition("\n")[0].strip() not in offered:
        text = "\n" + text  # after its thinking an answer starts at once: it is content unless it names a tool
    reply = _parse_answer(text, tools, offered)
    reply.reasoning_content = reasoning
    return reply


def _parse_answer(text: str, tools: list[dict] | None, offered: set) -> AssistantReply:
    head, sep, body = text.partition("\n")
    name = head.strip()
    if not sep or not name:
        return AssistantReply(content=(body if sep else text).strip())
    if tools is not None and name not in offered:
        return AssistantReply(content=text.strip(), error=f"{name!r} is not one of the offered tools")
    raw = body.strip()
    if raw.startswith("```"):
        raw = raw.strip("`").removeprefix("json").strip()
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as e:
        return AssistantReply(content=text.strip(), error=f"tool call {name!r} has invalid JSON arguments: {e}")
    if not isinstance(arguments, dict):
        return AssistantReply(content=text.strip(), error=f"tool call {name!r} arguments are not a JSON object")
    return AssistantReply(content="", tool_calls=[ToolCall(name, arguments)])


class ReplyStream:
    """A GLM-4 reply read as it streams in, when tools were offered: text comes out as soon as the reply is known
    to be an answer; a tool call ("name\n{json}": a first line that names an offered tool) is held back whole, to be
    parsed at the end (`held_back`). Without tools every piece is content. The newline GLM-4 opens an answer with is
    dropped. (A reasoning model's thinking is taken off first, by ReasoningStream.)
    """

    def __init__(self, tools: list[dict] | None) -> None:
        self.tools = tools
        self.offered = _offered_names(tools)
        self.mode = "undecided" if tools else "content"  # -> "content" or "call" once the first line is complete
        self.held = ""
        self.started = False

    def feed(self, piece: str) -> str:
        """The content to send now for this piece of generated text ("" while undecided or inside a call)."""
        if self.mode == "undecided":
            self.held += piece
            piece = ""
            if "\n" in self.held:
                if self.held.split("\n", 1)[0].strip() in self.offered:
                    self.mode = "call"
                else:
                    self.mode, piece, self.held = "content", self.held, ""
        elif self.mode == "call":
            self.held += piece
            piece = ""
        if self.mode == "content" and piece and not self.started:
            piece = piece.lstrip("\n")
            self.started = bool(piece)
        return piece

    def held_back(self) -> str | None:
        """At the end of the reply: the text held back (a tool call, or content that only looked like one, to be
        parsed with parse_assistant_reply), or None when everything was sent as content already."""
        return None if self.mode == "content" else self.held


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (to be held until the next piece)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """A reply split into thinking and answer as it streams in, never losing part of a tag that arrives in two
    pieces ("</th" + "ink>"): `feed(piece)` -> (thinking, answer) text to send now; `finish()` -> the rest. The
    thinking starts where the prompt opened it (`thinking=True`) or where the reply begins with "<think>"; it ends
    at "</think>" or, cut by the length limit, with the reply. Stripped as split_reasoning strips it, so that
    streamed and whole replies say the same."""

    def __init__(self, thinking: bool = False) -> None:
        self.state = "thinking" if thinking else "start"  # -> "after" (skipping blank space) -> "answer"
        self.held = ""
        self.started = False  # whether thinking text went out yet (its leading blank space is dropped)
        self.thought = thinking  # whether the reply had a thinking part at all

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        thought = answer = ""
        if self.state == "start":
            text = self.held.lstrip()
            if text.startswith(THINK_OPEN):
                self.state, self.thought, self.held = "thinking", True, text[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(text):
                return "", ""  # blank so far, or the start of "<think>": wait for more
            else:
                self.state = "answer"
        if self.state == "thinking":
            end = self.held.find(THINK_CLOSE)
            if end >= 0:
                thought, self.held, self.state = self.held[:end].rstrip(), self.held[end + len(THINK_CLOSE):], "after"
            else:  # hold a possible partial tag, and trailing blank space (dropped if the tag follows)
                keep = _partial_tag(self.held, THINK_CLOSE)
                body, tail = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                thought = body.rstrip()
                self.held = body[len(thought):] + tail
            if not self.started:
                thought = thought.lstrip()
                self.started = bool(thought)
        if self.state == "after":
            self.held = self.held.lstrip()
            if self.held:
                self.state = "answer"
        if self.state == "answer":
            answer, self.held = self.held, ""
        return thought, answer

    def finish(self) -> tuple[str, str]:
        """At the end of the reply: what is still held (a partial tag was text after all)."""
        held, self.held = self.held, ""
        if self.state == "thinking":
            return (held if self.started else held.lstrip()).rstrip(), ""
        return "", "" if self.state == "after" else held
