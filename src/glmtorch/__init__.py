"""glmtorch: the GLM-4 language-model family in pure PyTorch."""

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

__all__ = [
    "ATTENTION_BACKENDS", "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "CheckpointError", "ConfigError", "DynamicCache", "GlmConfig",
    "GlmForCausalLM", "GlmForSequenceClassification", "GlmForTokenClassification", "GlmModel",
    "GlmPreTrainedModel", "StaticCache", "infer_device", "AssistantReply", "ChatFormatError", "ToolCall",
    "parse_assistant_reply", "GenerationConfig", "TextIteratorStreamer", "stream_text", "AutoTokenizer",
    "GlmTokenizer", "TokenizerError",
]
