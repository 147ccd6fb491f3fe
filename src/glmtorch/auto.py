"""Auto classes: pick the config and model class from a checkpoint directory's config.json."""

from __future__ import annotations

import inspect
import os
from typing import Any

from .checkpoint.gguf import GgufFile, gguf_config, is_gguf
from .checkpoint.resolve import resolve_checkpoint
from .config import GlmConfig
from . import models
from .loading import load_config
from .tokenizer import GlmTokenizer


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **overrides: Any) -> GlmConfig:
        return load_config(resolve_checkpoint(path, need_weights=False), **overrides)[0]


def _file_config(path: str | os.PathLike, **overrides: Any) -> GlmConfig:
    if is_gguf(path):
        return gguf_config(GgufFile(os.fspath(path)), **overrides)
    return AutoConfig.from_pretrained(path, **overrides)


class _AutoModel:
    """Subclasses name the task they build (`ForCausalLM`, ...); the config's model_type picks the family's class
    (GlmForCausalLM for `glm` and THUDM's `chatglm`, Glm4ForCausalLM for `glm4`), which does the rest."""

    task = ""

    @classmethod
    def model_class(cls, config: GlmConfig):
        return getattr(models, models.CLASS_PREFIX[config.model_type] + cls.task)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args: Any, **kwargs: Any):
        config = kwargs.get("config")
        if config is None:
            overrides = {k: v for k, v in kwargs.items() if k not in _LOADER_ARGUMENTS}
            config = _file_config(path, **overrides)
        return cls.model_class(config).from_pretrained(path, *args, **kwargs)

    @classmethod
    def from_config(cls, config: GlmConfig, **kwargs: Any):
        return cls.model_class(config).from_config(config, **kwargs)


# from_pretrained's own keywords; every other keyword overrides a config field
_LOADER_ARGUMENTS = {name for name in inspect.signature(models.GlmPreTrainedModel.from_pretrained).parameters}


class AutoModel(_AutoModel):
    task = "Model"


class AutoModelForCausalLM(_AutoModel):
    task = "ForCausalLM"


class AutoModelForSequenceClassification(_AutoModel):
    task = "ForSequenceClassification"


class AutoModelForTokenClassification(_AutoModel):
    task = "ForTokenClassification"


class AutoTokenizer:
    """The tokenizer of a checkpoint directory, hub id or GGUF file (which carries its own)."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> GlmTokenizer:
        kwargs.pop("trust_remote_code", None)
        if os.fspath(path).endswith(".gguf"):
            from .checkpoint.gguf import gguf_tokenizer

            return gguf_tokenizer(os.fspath(path))
        return GlmTokenizer.from_pretrained(path, **kwargs)
