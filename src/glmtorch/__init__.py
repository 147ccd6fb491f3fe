"""glmtorch: the GLM-4 language-model family in pure PyTorch.

The names below are imported on first use (PEP 562), so `import glmtorch` and `glmtorch --help` cost nothing:
no torch, no model, no server until something asks for them.
"""

import importlib as _importlib
import os as _os

__version__ = "0.1.0"

# The small GLM chat model that ships inside the package (trained on Tiny Shakespeare; see README).
DEMO_MODEL = _os.path.join(_os.path.dirname(__file__), "demo_model")

# public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "ATTENTION_BACKENDS": "attention",
    "AutoConfig": "auto", "AutoModel": "auto", "AutoModelForCausalLM": "auto",
    "AutoModelForSequenceClassification": "auto", "AutoModelForTokenClassification": "auto",
    "DynamicCache": "cache", "StaticCache": "cache",
    "CheckpointError": "checkpoint.resolve",
    "ConfigError": "config", "GlmConfig": "config", "Glm4Config": "config",
    "AssistantReply": "chat", "ChatFormatError": "chat", "ToolCall": "chat", "parse_assistant_reply": "chat",
    "infer_device": "device",
    "MissingDependency": "extras",
    "GenerationConfig": "generation.config",
    "TextIteratorStreamer": "generation.streaming", "stream_text": "generation.streaming",
    "GlmForCausalLM": "models", "GlmForSequenceClassification": "models", "GlmForTokenClassification": "models",
    "GlmModel": "models", "GlmPreTrainedModel": "models",
    "Glm4ForCausalLM": "models", "Glm4ForSequenceClassification": "models", "Glm4ForTokenClassification": "models",
    "Glm4Model": "models", "Glm4PreTrainedModel": "models",
    "AutoTokenizer": "auto", "GlmTokenizer": "tokenizer", "TokenizerError": "tokenizer",
    "LLM": "serve.offline", "SamplingParams": "serve.offline",
}

__all__ = ["DEMO_MODEL", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'glmtorch' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
