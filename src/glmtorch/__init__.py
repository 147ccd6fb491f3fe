"""glmtorch: the GLM-4 language-model family in pure PyTorch."""

import os as _os

from .attention import ATTENTION_BACKENDS
from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .cache import DynamicCache, StaticCache
from .checkpoint import CheckpointError
from .config import ConfigError, GlmConfig
from .chat import AssistantReply, ChatFormatError, ToolCall, parse_assistant_reply
from .device import infer_device
from .generation.config import GenerationConfig
from .generation.streaming import TextIteratorStreamer, stream_text
from .modeling import GlmForCausalLM, GlmForSequenceClassification, GlmForTokenClassification, GlmModel, GlmPreTrainedModel

from .tokenizer import AutoTokenizer, GlmTokenizer, TokenizerError

__version__ = "0.1.0"

# The small GLM chat model that ships inside the package (trained on Tiny Shakespeare; see README).
DEMO_MODEL = _os.path.join(_os.path.dirname(__file__), "demo_model")

__all__ = [
    "DEMO_MODEL", "ATTENTION_BACKENDS", "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "CheckpointError", "ConfigError", "DynamicCache", "GlmConfig",
    "GlmForCausalLM", "GlmForSequenceClassification", "GlmForTokenClassification", "GlmModel",
    "GlmPreTrainedModel", "StaticCache", "infer_device", "AssistantReply", "ChatFormatError", "ToolCall",
    "parse_assistant_reply", "GenerationConfig", "TextIteratorStreamer", "stream_text", "AutoTokenizer",
    "GlmTokenizer", "TokenizerError",
]
