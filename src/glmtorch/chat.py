"""Chat templates and GLM-4 function calling.

Templates render in jinja2's immutable sandbox (a checkpoint's template is untrusted input). Messages are
normalised first: OpenAI `tool` messages become GLM's `observation` turns, content given as a list of text
parts is joined, and an assistant message with OpenAI `tool_calls` becomes GLM-4's own form, the function
name on the role line and the JSON arguments below it:

    <|assistant|>get_weather
    {"city": "Paris"}

`parse_assistant_reply` turns a generated reply back into plain content or a tool call.
"""

from __future__ import annotations

import json
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
    """The built-in template of a family ("glm4", or "chatglm3" for ChatGLM2/3), used when a checkpoint ships none."""
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
                add_generation_prompt: bool = False, **extra: Any) -> str:
    try:
        return _compile(template).render(messages=normalize_messages(messages), tools=tools or None,
                                          add_generation_prompt=add_generation_prompt, **extra)
    except ChatFormatError:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in the template, sandbox violations
        raise ChatFormatError(f"the chat template failed to render: {e}") from None


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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


def parse_assistant_reply(text: str, tools: list[dict] | None = None) -> AssistantReply:
    """GLM-4 answers with "\\ncontent" or, to call a function, "name\\n{json arguments}".

    With `tools`, a name that is not among them means plain content. Malformed JSON is reported in `error`
    and the reply kept as content; this never raises.
    """
    head, sep, body = text.partition("\n")
    name = head.strip()
    if not sep or not name:
        return AssistantReply(content=(body if sep else text).strip())
    offered = {(t.get("function", t) or {}).get("name") for t in tools or []}
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
