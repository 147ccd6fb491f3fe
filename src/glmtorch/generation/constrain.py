"""Structured output: a logits processor that masks every token that cannot continue a valid output.

Built on llguidance (chosen by measurement over xgrammar and outlines-core on a GLM-4-sized vocabulary, see
README "Structured output"): it takes the tokenizer's own tokenizer.json, compiles a JSON schema in about a
millisecond, computes a token mask in ~10 us, needs no other package, and names what it does not support.

A constraint is one of (OpenAI's `response_format` shapes, and vLLM's extra fields):

    {"type": "json_object"}                                        any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    {"type": "regex", "regex": "..."}      {"type": "choice", "choice": ["a", "b"]}
    {"type": "tool_call", "tools": [...]}  GLM-4's "name\\n{json arguments}", arguments valid for that tool

`compile_constraint(tokenizer, spec)` checks and compiles it once per (tokenizer, constraint) and raises
`ConstraintError` naming what is wrong; `GrammarProcessor` follows one or more rows of generation.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

import torch

from ..extras import require


class ConstraintError(ValueError):
    """A response format glmtorch cannot enforce: malformed, or using a feature the grammar engine lacks."""


def _llguidance():
    return require("llguidance", "constrained output (response_format, guided decoding)")


# -- what to enforce -------------------------------------------------------------------------------------------
KINDS = ("json_object", "json_schema", "regex", "choice", "tool_call")
# JSON written as json.dumps writes it: one space after ',' and ':', no other whitespace. Free whitespace lets a
# model fill the output with blank lines (seen: a small model opened "{" and wrote spaces until the token limit).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def as_constraint_spec(value: Any) -> dict:
    """A response format as given to generate(): one of KINDS' dicts, or a bare JSON schema."""
    if isinstance(value, dict) and value.get("type") in KINDS:
        return value
    if isinstance(value, (dict, bool)):
        return {"type": "json_schema", "json_schema": {"name": "schema", "schema": value}}
    raise ConstraintError(f"response_format must be a JSON schema or a response-format dict, got "
                          f"{type(value).__name__}")


def grammar_for(spec: dict) -> str:
    """The llguidance grammar of a constraint spec (see the module's docstring)."""
    llg = _llguidance()
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ConstraintError("a response format is a dict with a 'type' (json_object, json_schema, regex, choice)")
    try:
        return _grammar(llg, spec, spec["type"])
    except ValueError as e:  # the engine's own complaint about a schema (not a JSON object, say)
        if isinstance(e, ConstraintError):
            raise
        raise ConstraintError(f"cannot enforce this response format: {e}") from None


def _grammar(llg, spec: dict, kind: str) -> str:
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_LAYOUT)
    if kind == "json_schema":
        wrapper = spec.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError("json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return llg.LLMatcher.grammar_from_json_schema(_plain_schema(schema), overrides=JSON_LAYOUT)
    if kind == "regex":
        if not isinstance(spec.get("regex"), str) or not spec["regex"]:
            raise ConstraintError("regex needs a non-empty 'regex' string")
        return llg.LLMatcher.grammar_from_regex(spec["regex"])
    if kind == "choice":
        choices = spec.get("choice")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choice needs a non-empty list of non-empty strings")
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if kind == "tool_call":
        return llg.LLMatcher.grammar_from_lark(_tool_call_lark(spec.get("tools") or []))
    raise ConstraintError(f"response format type {kind!r} is not one of json_object, json_schema, regex, choice")


def _plain_schema(schema):
    """The schema without keys that constrain nothing ("uniqueItems": false), which the engine would refuse."""
    schema = copy.deepcopy(schema)

    def clean(node):
        if isinstance(node, dict):
            if node.get("uniqueItems") is False:
                del node["uniqueItems"]
            for value in node.values():
                clean(value)
        elif isinstance(node, list):
            for value in node:
                clean(value)
    clean(schema)
    return schema


def _tool_call_lark(tools: list[dict]) -> str:
    """GLM-4's tool call: the function's name, a newline, its arguments as JSON valid for its `parameters`."""
    if not tools:
        raise ConstraintError("a required tool call needs at least one tool")
    rules = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)
        parameters = function.get("parameters") or {"type": "object"}
        schema = {**_plain_schema(parameters), "x-guidance": JSON_LAYOUT}
        rules.append((f"call_{i}", f'{json.dumps(function["name"] + chr(10))} args_{i}',
                      f"args_{i}: %json {json.dumps(schema)}"))
    start = "start: " + " | ".join(name for name, _, _ in rules)
    return "\n".join([start] + [f"{name}: {body}\n{args}" for name, body, args in rules])


# -- compiling, once per (tokenizer, constraint) ----------------------------------------------------------------
_TOKENIZERS: dict[int, tuple[Any, Any]] = {}  # id(GlmTokenizer) -> (the tokenizer, its LLTokenizer)


def engine_tokenizer(tokenizer, vocab_size: int, stop_ids) -> Any:
    """The grammar engine's view of a GlmTokenizer (built once: ~0.6 s on a 151,552-token vocabulary). Stop ids
    end a reply: they are allowed once the output is complete."""
    llg = _llguidance()
    key = (id(tokenizer), vocab_size, tuple(sorted(stop_ids)))
    held = _TOKENIZERS.get(key)
    if held is None or held[0] is not tokenizer:
        if not hasattr(tokenizer.backend, "to_str"):
            raise ConstraintError("constrained output needs a tokenizer.json tokenizer (this one is SentencePiece)")
        backend = json.loads(tokenizer.backend.to_str())
        backend["padding"] = backend["truncation"] = None
        stops = sorted(stop_ids) or [tokenizer.eos_token_id]
        held = (tokenizer, llg.LLTokenizer(json.dumps(backend), n_vocab=vocab_size, eos_token=stops))
        _TOKENIZERS[key] = held
    return held[1]


@lru_cache(maxsize=256)
def _prototype(lltokenizer, grammar: str):
    llg = _llguidance()
    matcher = llg.LLMatcher(lltokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"cannot enforce this response format: {matcher.get_error()}")
    return matcher


def compile_constraint(tokenizer, spec: dict, vocab_size: int, stop_ids=()) -> "Constraint":
    """A checked, compiled constraint; each row that follows it gets a copy of its matcher."""
    lltok = engine_tokenizer(tokenizer, vocab_size, stop_ids)
    grammar = grammar_for(spec)
    return Constraint(_prototype(lltok, grammar), vocab_size, set(lltok.eos_tokens))


class Constraint:
    def __init__(self, prototype, vocab_size: int, stop_ids: set[int]) -> None:
        self.prototype, self.vocab_size, self.stop_ids = prototype, vocab_size, stop_ids

    def processor(self) -> "GrammarProcessor":
        return GrammarProcessor(self)


# -- following generation --------------------------------------------------------------------------------------
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarProcessor:
    """A logits processor (history (B, L), logits (B, V)) -> logits: every row gets its own matcher, fed the tokens
    generated since the last call (the first call sees the prompt only), and its disallowed tokens set to -inf.
    A row whose output is complete may only end (its stop tokens); a finished row (padding) is left alone."""

    def __init__(self, constraint: Constraint) -> None:
        self.constraint = constraint
        self.matchers: list = []
        self.prompt_length: int | None = None
        self.fed: list[int] = []
        self.ended: list[bool] = []  # the row wrote a stop token: generation is over for it

    def __call__(self, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        rows, length = history.shape
        if self.prompt_length is None:
            self.prompt_length = length
            self.matchers = [self.constraint.prototype.deep_copy() for _ in range(rows)]
            self.fed, self.ended = [0] * rows, [False] * rows
        words = (self.constraint.vocab_size + 31) // 32
        bitmask = torch.empty(rows, words, dtype=torch.int32)
        for b, matcher in enumerate(self.matchers):
            new = history[b, self.prompt_length + self.fed[b]:].tolist()
            self.fed[b] += len(new)
            for token in new:
                if self.ended[b]:
                    break
                self.ended[b] = token in self.constraint.stop_ids
                matcher.consume_token(token)
            if self.ended[b] or matcher.is_error():
                bitmask[b] = -1  # over (or derailed by a token it refused): nothing left to enforce
            else:  # a complete output allows only the stop tokens
                matcher.unsafe_compute_mask_ptr(bitmask[b].data_ptr(), words * 4)
        allowed = ((bitmask[:, :, None] >> _SHIFTS) & 1).bool().view(rows, -1)[:, :logits.shape[-1]]
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
