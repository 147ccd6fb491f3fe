"""Auto classes: pick the config and model class from a checkpoint directory's config.json."""

from __future__ import annotations

import os
from typing import Any

from .checkpoint.resolve import resolve_checkpoint
from .config import GlmConfig
from . import models
from .loading import load_config
from .tokenizer import GlmTokenizer


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **overrides: Any) -> GlmConfig:
        return load_config(resolve_checkpoint(path, need_weights=False), **overrides)[0]


class _AutoModel:
    """Subclasses name the class they build; `from_pretrained` forwards everything to it."""

    class_name = ""

    @classmethod
    def model_class(cls):
        return getattr(models, cls.class_name)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args: Any, **kwargs: Any):
        return cls.model_class().from_pretrained(path, *args, **kwargs)

    @classmethod
    def from_config(cls, config: GlmConfig, **kwargs: Any):
        return cls.model_class().from_config(config, **kwargs)


class AutoModel(_AutoModel):
    class_name = "GlmModel"


class AutoModelForCausalLM(_AutoModel):
    class_name = "GlmForCausalLM"


class AutoModelForSequenceClassification(_AutoModel):
    class_name = "GlmForSequenceClassification"


class AutoModelForTokenClassification(_AutoModel):
    class_name = "GlmForTokenClassification"


class AutoTokenizer:
    """The tokenizer of a checkpoint directory, hub id or GGUF file (which carries its own)."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> GlmTokenizer:
        kwargs.pop("trust_remote_code", None)
        if os.fspath(path).endswith(".gguf"):
            from .checkpoint.gguf import gguf_tokenizer

            return gguf_tokenizer(os.fspath(path))
        return GlmTokenizer.from_pretrained(path, **kwargs)
