"""Checkpoints: resolving paths and hub ids, safetensors I/O, and one name table per format."""

from . import gguf as _gguf  # noqa: F401  (registers the .gguf weight reader)
from .formats import TRANSFORMERS, Rule, WeightFormat
from .resolve import CheckpointError, resolve_checkpoint
from .safetensors_io import parse_dtype, parse_size, save_safetensors, weight_files

__all__ = [
    "CheckpointError", "Rule", "TRANSFORMERS", "WeightFormat", "parse_dtype", "parse_size",
    "resolve_checkpoint", "save_safetensors", "weight_files",
]


def detect_format(config_dict: dict, directory: str, **overrides):
    """(GlmConfig, WeightFormat) for a checkpoint's config.json, by its model_type."""
    from ..config import CONFIG_CLASSES, ConfigError

    from .thudm import THUDM, config_from_thudm

    model_type = config_dict.get("model_type", "glm")
    if model_type in CONFIG_CLASSES:  # transformers' glm (GLM-4-9B) and glm4 (GLM-4-0414, GLM-Z1)
        return CONFIG_CLASSES[model_type].from_dict(config_dict, **overrides), TRANSFORMERS
    if model_type == "chatglm":
        try:
            return config_from_thudm(config_dict, **overrides), THUDM
        except KeyError as e:
            raise ConfigError(f"{directory}: config.json (model_type 'chatglm') lacks the field {e}") from None
    raise ConfigError(f"{directory}: config.json has model_type={model_type!r}, which is not a checkpoint format "
                      "glmtorch reads ('glm' and 'glm4' from transformers, 'chatglm' from THUDM)")
