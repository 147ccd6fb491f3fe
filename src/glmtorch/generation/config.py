"""`GenerationConfig`: decoding defaults, read from a checkpoint's generation_config.json (or derived from the
model config), overridden per call, and validated before any compute."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"


class SamplingValueError(ValueError):
    """A decoding parameter outside its declared range; `field` names it (the server answers 400 with it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Bound:
    """The values a decoding parameter may take: an int or a finite, non-subnormal float in [low, high] (low
    excluded when `low_open`), or exactly 0 when `zero_ok` (temperature: 0 means greedy)."""

    kind: type
    low: float
    high: float
    low_open: bool = False
    zero_ok: bool = False
    why: str = ""


INT_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
# Every decoding parameter's range, checked here for generate(), the command line and the server alike. The
# bounds are where the arithmetic stays finite: logits / temperature and logits / repetition_penalty overflow
# to inf (and softmax to NaN) for divisors near 0, so temperatures below 1e-5 are an error (0 is greedy).
SAMPLING_BOUNDS: dict[str, Bound] = {
    "temperature": Bound(float, 1e-5, 100.0, zero_ok=True, why="0 (greedy) or between 1e-05 and 100"),
    "top_p": Bound(float, 0.0, 1.0, low_open=True, why="in (0, 1]"),
    "top_k": Bound(int, 0, INT_MAX, why="an integer >= 0 (0 disables it)"),
    "min_p": Bound(float, 0.0, 1.0, why="in [0, 1]"),
    "repetition_penalty": Bound(float, 0.01, 100.0, why="between 0.01 and 100 (1.0 disables it)"),
    "presence_penalty": Bound(float, -2.0, 2.0, why="between -2 and 2 (0 disables it)"),  # OpenAI's ranges
    "frequency_penalty": Bound(float, -2.0, 2.0, why="between -2 and 2 (0 disables it)"),
    "max_new_tokens": Bound(int, 1, INT_MAX, why="an integer >= 1"),
    "min_new_tokens": Bound(int, 0, INT_MAX, why="an integer >= 0"),
    "max_length": Bound(int, 1, INT_MAX, why="an integer >= 1"),
    "seed": Bound(int, 0, SEED_MAX, why=f"an integer in [0, {SEED_MAX}]"),
    "prompt_lookup_num_tokens": Bound(int, 1, 64, why="an integer in [1, 64]"),
    "max_matching_ngram_size": Bound(int, 1, 16, why="an integer in [1, 16]"),
    "num_assistant_tokens": Bound(int, 1, 64, why="an integer in [1, 64]"),
}


def check_sampling_value(name: str, value: Any, shown: str | None = None) -> Any:
    """`value` if it lies in SAMPLING_BOUNDS[name] (as a float for float parameters), else SamplingValueError
    naming the parameter as `shown` (the caller's spelling, e.g. the API's max_tokens)."""
    bound, shown = SAMPLING_BOUNDS[name], shown or name

    def bad(why: str):
        raise SamplingValueError(shown, f"{shown}={value!r}: {why}")

    kinds = (int,) if bound.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        bad(f"must be {'an integer' if bound.kind is int else 'a number'}, {bound.why}")
    if bound.kind is float:
        value = float(value)
        if not math.isfinite(value):
            bad(f"must be finite, {bound.why}")
        if value != 0 and abs(value) < sys.float_info.min:
            bad(f"is subnormal; must be {bound.why}")
    if value == 0 and bound.zero_ok:
        return value
    below = value <= bound.low if bound.low_open else value < bound.low
    if below or value > bound.high:
        bad(f"out of range: must be {bound.why}")
    return value


def check_logit_bias(bias: Any, vocab: int, shown: str = "logit_bias") -> dict[int, float]:
    """OpenAI's logit_bias: {token id: bias in [-100, 100]} with ids in [0, vocab); JSON's keys, strings of digits,
    are taken as ids. Returns {int: float}; SamplingValueError naming the first bad entry."""
    if not isinstance(bias, dict):
        raise SamplingValueError(shown, f"{shown} must be an object mapping token ids to biases in [-100, 100]")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdecimal() and key.isascii() else key
        if type(token) is not int or not 0 <= token < vocab:
            raise SamplingValueError(shown, f"{shown}: {key!r} is not a token id in [0, {vocab})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise SamplingValueError(shown, f"{shown}[{key!r}]={value!r}: must be a number in [-100, 100]")
        out[token] = float(value)
    return out


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None
    max_length: int | None = 20  # prompt + new tokens, used when max_new_tokens is not given (as transformers)
    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0
    # prompt-lookup speculation (transformers' names): propose up to this many tokens copied from the prompt and
    # output, matching n-grams of at most max_matching_ngram_size tokens (generation.speculate)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int | None = None  # tokens a draft model (generate's assistant_model) proposes per pass
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GenerationConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        return cls(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                   bos_token_id=config.bos_token_id)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def updated(self, **changes: Any) -> "GenerationConfig":
        """A copy with the non-None `changes` applied and every field validated."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"generate() got unknown argument(s): {', '.join(sorted(unknown))}")
        merged = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        if changes.get("max_new_tokens") is not None:
            merged.max_length = None  # an explicit max_new_tokens wins over the configured max_length
        merged.validate()
        return merged

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        for name in SAMPLING_BOUNDS:
            if getattr(self, name, None) is not None:
                setattr(self, name, check_sampling_value(name, getattr(self, name)))
        if self.do_sample and self.temperature == 0:
            bad("temperature", "must be > 0 when sampling; use do_sample=False for greedy decoding")
        for i in self.eos_token_ids:
            if not isinstance(i, int) or i < 0:
                bad("eos_token_id", "must be a non-negative token id or a list of them")
