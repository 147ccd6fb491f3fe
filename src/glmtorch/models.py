"""The model classes users import: the math of modeling.py with loading (`from_pretrained`, `save_pretrained`,
`from_config`) and generation (`generate`) given as mixins, assembled here, one layer above the math, so that
modeling.py imports no loader and the loader and the decode loop never import modeling.py."""

from __future__ import annotations

from . import modeling
from .config import Glm4Config
from .generation.mixin import GenerationMixin
from .loading import PretrainedMixin


class GlmPreTrainedModel(PretrainedMixin, modeling.GlmPreTrainedModel):
    """The base of every public GLM model: config, weight init, the static cache, loading and saving."""


class GlmModel(GlmPreTrainedModel, modeling.GlmModel):
    """The decoder stack: embeddings, layers, final norm; returns hidden states."""


class GlmForCausalLM(GlmPreTrainedModel, GenerationMixin, modeling.GlmForCausalLM):
    """The decoder with its language-model head: logits, loss, generate()."""


class GlmForSequenceClassification(GlmPreTrainedModel, modeling.GlmForSequenceClassification):
    """The decoder with a classification head read at each row's last real token."""


class GlmForTokenClassification(GlmPreTrainedModel, modeling.GlmForTokenClassification):
    """The decoder with a per-token classification head."""


# GLM-4-0414 / GLM-Z1 (transformers' `glm4`): the same classes under a Glm4Config, whose sandwich norms the layers
# build; what these add is the config they require and the architecture name save_pretrained writes.
class Glm4PreTrainedModel(GlmPreTrainedModel):
    config_class = Glm4Config


class Glm4Model(GlmModel):
    config_class = Glm4Config


class Glm4ForCausalLM(GlmForCausalLM):
    config_class = Glm4Config


class Glm4ForSequenceClassification(GlmForSequenceClassification):
    config_class = Glm4Config


class Glm4ForTokenClassification(GlmForTokenClassification):
    config_class = Glm4Config


# model_type -> the class name prefix of its model classes (auto classes choose by it)
CLASS_PREFIX = {"glm": "Glm", "glm4": "Glm4"}
