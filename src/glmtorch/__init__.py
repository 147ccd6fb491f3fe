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
from .device import infer_device
from .modeling import GlmForCausalLM, GlmForSequenceClassification, GlmForTokenClassification, GlmModel, GlmPreTrainedModel

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_BACKENDS", "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "CheckpointError", "ConfigError", "DynamicCache", "GlmConfig",
    "GlmForCausalLM", "GlmForSequenceClassification", "GlmForTokenClassification", "GlmModel",
    "GlmPreTrainedModel", "StaticCache", "infer_device",
]
