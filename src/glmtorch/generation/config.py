"""`GenerationConfig`: decoding defaults, read from a checkpoint's generation_config.json (or derived from the
model config), overridden per call, and validated before any compute."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"


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

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            bad("max_new_tokens", "must be an integer >= 1")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            bad("max_length", "must be an integer >= 1")
        if self.do_sample:
            if self.temperature is not None and not self.temperature > 0:
                bad("temperature", "must be > 0 when sampling; use do_sample=False for greedy decoding")
        elif self.temperature is not None and self.temperature < 0:
            bad("temperature", "must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad("top_k", "must be an integer >= 0 (0 disables it)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1.0 disables it)")
        for i in self.eos_token_ids:
            if not isinstance(i, int) or i < 0:
                bad("eos_token_id", "must be a non-negative token id or a list of them")
