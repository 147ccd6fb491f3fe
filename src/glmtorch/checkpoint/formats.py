"""Checkpoint formats as tables: how each format's tensor names map to glmtorch's.

A rule is (fullmatch regex over the checkpoint's name, target templates, transform). Targets are written
with the regex's groups (`\\1` = layer index); no target means "drop this tensor"; a transform turns one
stored tensor into one tensor per target (checking a fused QKV's rows, say). A name that no rule matches is
an error that names it, never silently skipped.

Some of glmtorch's parameters stack several stored tensors (vLLM's stacked parameters): `qkv_proj` is
[q_proj | k_proj | v_proj] along its rows. A target `name#part` says "this tensor is `part` of the stacked
parameter `name`"; the loader joins the parts in STACKED's order once all have arrived. Apart from that,
glmtorch's names are transformers' names, so that format's table is the identity written out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import GlmConfig
from ..modeling import STACKED  # the model owns its fused parameters and their parts' order

Transform = Callable[[torch.Tensor, GlmConfig], tuple[torch.Tensor, ...]]

_LAYER = r"(?:model\.)?layers\.(\d+)\."

def split_stacked(target: str) -> tuple[str, str | None]:
    """'...self_attn.qkv_proj.weight#k_proj' -> ('...self_attn.qkv_proj.weight', 'k_proj'); plain names -> (name, None)."""
    name, _, part = target.partition("#")
    return name, part or None


def stacked_parts(name: str) -> tuple[str, ...]:
    """The parts of a stacked parameter, in row order ('...self_attn.qkv_proj.weight' -> q, k, v_proj)."""
    return STACKED[name.rpartition(".")[0].rpartition(".")[2]]


def part_name(target: str) -> str:
    """The unstacked name of a target ('...self_attn.k_proj.weight' for the example above): how the
    tensor-parallel plan and error messages know it."""
    name, part = split_stacked(target)
    if part is None:
        return name
    module, _, leaf = name.rpartition(".")
    return f"{module.rpartition('.')[0]}.{part}.{leaf}"


@dataclass(frozen=True)
class Rule:
    pattern: str
    targets: tuple[str, ...]
    transform: Transform | None = None


@dataclass(frozen=True)
class WeightFormat:
    name: str
    rules: tuple[Rule, ...]

    def map_name(self, name: str) -> tuple[list[str], Transform | None] | None:
        """Targets for a stored tensor name ([] = drop), or None when no rule knows it."""
        for rule in self.rules:
            m = re.fullmatch(rule.pattern, name)
            if m:
                return [m.expand(t) for t in rule.targets], rule.transform
        return None


# transformers' GlmForCausalLM / Glm4ForCausalLM / GlmModel / heads (with or without the "model." prefix of the heads).
TRANSFORMERS = WeightFormat("transformers", (
    Rule(r"(?:model\.)?embed_tokens\.weight", ("model.embed_tokens.weight",)),
    Rule(_LAYER + r"input_layernorm\.weight", (r"model.layers.\1.input_layernorm.weight",)),
    Rule(_LAYER + r"self_attn\.([qkv]_proj)\.(weight|bias|scales)", (r"model.layers.\1.self_attn.qkv_proj.\3#\2",)),
    Rule(_LAYER + r"self_attn\.o_proj\.weight", (r"model.layers.\1.self_attn.o_proj.weight",)),
    Rule(_LAYER + r"post_attention_layernorm\.weight", (r"model.layers.\1.post_attention_layernorm.weight",)),
    Rule(_LAYER + r"(post_self_attn_layernorm|post_mlp_layernorm)\.weight", (r"model.layers.\1.\2.weight",)),  # glm4
    Rule(_LAYER + r"mlp\.gate_up_proj\.weight", (r"model.layers.\1.mlp.gate_up_proj.weight",)),
    Rule(_LAYER + r"mlp\.down_proj\.weight", (r"model.layers.\1.mlp.down_proj.weight",)),
    Rule(r"(?:model\.)?norm\.weight", ("model.norm.weight",)),
    Rule(r"lm_head\.weight", ("lm_head.weight",)),
    # weight-only quantized layers (glmtorch's own int8/int4 checkpoints) carry scales beside their weights
    Rule(_LAYER + r"(self_attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)\.scales",
         (r"model.layers.\1.\2.scales",)),
    Rule(r"lm_head\.scales", ("lm_head.scales",)),
    Rule(r"score\.(weight|bias)", (r"score.\1",)),
    Rule(r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", ()),  # computed, never loaded
))
