"""`GlmConfig`: the fields of transformers' GlmConfig, with the same defaults, read from and written to
config.json.

Real checkpoints spell the rotary settings two ways and both are read here:
- transformers 4.x: top-level `rope_theta`, `partial_rotary_factor`, optional `rope_scaling` dict;
- transformers 5.x: a `rope_parameters` dict holding `rope_type`, `rope_theta`, `partial_rotary_factor`.
config.json is written in the 5.x spelling plus the two top-level 4.x keys, so both generations of
transformers read it back as the same model.

Unknown keys are kept (and written back), never silently dropped: dropping them is how mlx-lm lost GLM's
`partial_rotary_factor`. Derived sizes are computed once in `__post_init__`, and a config that
contradicts itself raises `ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
ROPE_TYPES = ("default", "linear")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Keys real config.json files carry that say nothing about the model's math; kept quietly.
_METADATA_KEYS = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "model_type", "architectures",
    "auto_map", "return_dict", "output_hidden_states", "output_attentions", "is_decoder",
    "chunk_size_feed_forward", "tokenizer_class", "quantization", "_attn_implementation", "is_encoder_decoder",
}


# Declared range of every number in the config, checked in one place (__post_init__) before anything is
# allocated: wide enough for every GLM released (GLM-4-9B-chat-1M's 1,048,576 positions, 151,552 words) and far
# beyond, narrow enough that a typo (num_hidden_layers=1000000000) is an error, not a hang while memory grows.
FIELD_RANGES: dict[str, tuple[type, float, float]] = {
    "vocab_size": (int, 1, 2**24),
    "hidden_size": (int, 1, 2**17),
    "intermediate_size": (int, 1, 2**20),
    "num_hidden_layers": (int, 1, 1024),
    "num_attention_heads": (int, 1, 1024),
    "num_key_value_heads": (int, 1, 1024),
    "head_dim": (int, 2, 4096),
    "max_position_embeddings": (int, 1, 2**24),
    "partial_rotary_factor": (float, 0.0, 1.0),
    "attention_dropout": (float, 0.0, 1.0),
    "initializer_range": (float, 0.0, 10.0),
    "rms_norm_eps": (float, 0.0, 1.0),
    "rope_theta": (float, 0.0, 1e12),
    "pad_token_id": (int, 0, 2**24),
    "bos_token_id": (int, 0, 2**31 - 1),
    "num_labels": (int, 1, 2**20),
    "classifier_dropout": (float, 0.0, 1.0),
}
OPTIONAL_FIELDS = {"num_key_value_heads", "head_dim", "pad_token_id", "bos_token_id", "num_labels",
                   "classifier_dropout"}


class ConfigError(ValueError):
    """A config.json or GlmConfig argument that is missing, malformed or contradicts itself."""


@dataclass
class GlmConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    partial_rotary_factor: float = 0.5
    head_dim: int | None = 128
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1.5625e-07
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    pad_token_id: int | None = 151329
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151329, 151336, 151338])
    bos_token_id: int | None = None
    attention_bias: bool = True
    # Rotary scaling beyond the default: {"rope_type": "linear", "factor": 2.0}; None for plain RoPE.
    rope_scaling: dict | None = None
    # Classification heads (as transformers' PretrainedConfig).
    num_labels: int | None = None
    problem_type: str | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    classifier_dropout: float | None = None
    # Metadata written back to config.json.
    architectures: list[str] | None = None
    dtype: str | None = None
    # Keys this class does not know, kept so that nothing is lost on a round trip.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "glm"
    # GLM-4-0414 / GLM-Z1 (`glm4`) normalise each sub-layer's output before its residual add; GLM-4-9B does not.
    sandwich_norms = False

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")

        for name, (kind, low, high) in FIELD_RANGES.items():  # every size and number, before anything uses it
            value = getattr(self, name)
            if value is None and name in OPTIONAL_FIELDS:
                continue
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                fail(name, f"must be an integer in [{low}, {high}]")
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    fail(name, f"must be a finite number in [{low}, {high}]")
                if value != 0 and abs(value) < sys.float_info.min:
                    fail(name, "is subnormal")
            if not low <= value <= high:
                fail(name, f"out of range: must be in [{low}, {high}]")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                fail("hidden_size", f"head_dim is not set and hidden_size is not divisible by "
                     f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads > self.num_attention_heads:
            fail("num_key_value_heads", f"must not exceed num_attention_heads={self.num_attention_heads}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in eos):
            fail("eos_token_id", "must be a token id (an integer >= 0), a list of them, or null")
        if not 0 <= (self.pad_token_id if self.pad_token_id is not None else 0) < self.vocab_size:
            fail("pad_token_id", f"must be a token id below vocab_size={self.vocab_size} (padding is fed to the "
                 "model as a token), or null")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} must be divisible "
                 "by num_key_value_heads (each key/value head serves a whole group of query heads)")
        if not 0.0 < float(self.partial_rotary_factor) <= 1.0:
            fail("partial_rotary_factor", "must be in (0, 1]")
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2:
            fail("partial_rotary_factor", f"gives a rotary dimension of {rotary_dim} "
                 f"(head_dim={self.head_dim} * {self.partial_rotary_factor}); it must be even and >= 2")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"unknown activation; expected one of {', '.join(ACTIVATIONS)}")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        if self.attention_dropout >= 1.0:
            fail("attention_dropout", "must be in [0, 1)")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                fail("rope_scaling", f"unknown rope type {rope_type!r}; glmtorch supports {', '.join(ROPE_TYPES)}")
            self.rope_scaling["rope_type"] = rope_type
            self.rope_scaling.pop("type", None)
            if rope_type == "default":
                self.rope_scaling = None
            elif not isinstance(self.rope_scaling.get("factor"), (int, float)) \
                    or not 0 < self.rope_scaling["factor"] <= 1e6:
                fail("rope_scaling", f"rope type {rope_type!r} needs a positive 'factor'")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            fail("problem_type", f"expected one of {', '.join(PROBLEM_TYPES)}")
        # Labels: id2label decides num_labels when given, as in transformers.
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                fail("num_labels", f"contradicts id2label, which has {len(self.id2label)} labels")
            self.num_labels = len(self.id2label)
        if self.num_labels is None:
            self.num_labels = 2
        if self.num_labels < 1:
            fail("num_labels", "must be at least 1")
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    # -- derived sizes -------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head are rotated (GLM rotates half of them)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def rope_parameters(self) -> dict:
        """The 5.x spelling of the rotary settings."""
        params = {"rope_type": "default", "rope_theta": self.rope_theta,
                  "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_scaling:
            params.update(self.rope_scaling)
        return params

    # -- dict / json -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "GlmConfig":
        data = {**copy.deepcopy(data), **overrides}
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"config has model_type={model_type!r}; {cls.__name__} reads {cls.model_type!r} "
                              "configs (glmtorch.AutoConfig picks the class for any GLM checkpoint format)")
        if "torch_dtype" in data and "dtype" not in data:
            data["dtype"] = data.pop("torch_dtype")
        rope = data.pop("rope_parameters", None)
        if rope is not None:
            if not isinstance(rope, dict):
                raise ConfigError(f"config rope_parameters={rope!r}: expected a dict")
            rope = dict(rope)
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in rope:
                    data[key] = rope.pop(key)
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                data["rope_scaling"] = rope
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        unknown = sorted(k for k in extra if k not in _METADATA_KEYS)
        if unknown:
            warnings.warn(f"{cls.__name__}: keeping unrecognised config keys {unknown} as they are", stacklevel=2)
        known["extra"] = {**known.get("extra", {}), **extra}
        try:
            return cls(**known)
        except TypeError as e:  # a field of the wrong kind, e.g. a string where a number goes
            raise ConfigError(f"config.json is malformed: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling"):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["rope_parameters"] = self.rope_parameters
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        out["model_type"] = self.model_type
        if out.get("architectures") is None:
            out.pop("architectures")
        if out.get("dtype") is None:
            out.pop("dtype")
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GlmConfig":
        return cls.from_dict(read_config_json(path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "GlmConfig":
        """Read `config.json` from a checkpoint directory (or a hub id, through the local cache)."""
        from .checkpoint.resolve import resolve_checkpoint

        directory = resolve_checkpoint(path, need_weights=False)
        return cls.from_dict(read_config_json(os.path.join(directory, CONFIG_NAME)), **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        write_text_atomic(os.path.join(directory, CONFIG_NAME), self.to_json_string())

    def copy(self, **changes: Any) -> "GlmConfig":
        return self.from_dict(self.to_dict(), **changes)


@dataclass
class Glm4Config(GlmConfig):
    """GLM-4-0414 and GLM-Z1 (transformers' `glm4`): GlmConfig's fields and defaults (transformers gives both
    classes the same), read as the decoder with two more RMSNorms per layer (`sandwich_norms`). The released
    checkpoints' config.json set their own values (GLM-4-9B-0414: rms_norm_eps 1e-5, 32,768 positions)."""

    model_type = "glm4"
    sandwich_norms = True


CONFIG_CLASSES = {cls.model_type: cls for cls in (GlmConfig, Glm4Config)}


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a config.json, turning every way it can be broken into one clear `ConfigError`."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file; a checkpoint directory must contain config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); the file may be truncated or corrupt") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old file or the new one, never half of it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
