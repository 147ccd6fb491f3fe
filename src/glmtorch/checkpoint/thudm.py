"""THUDM's original checkpoint format (`model_type: "chatglm"`): GLM-4-9B(-chat, -1M), CodeGeeX4, ChatGLM2-6B
and ChatGLM3-6B, which transformers only runs with `trust_remote_code`. The same math as GLM under other names:

    theirs                                                   ours
    transformer.embedding.word_embeddings                    model.embed_tokens
    transformer.encoder.layers.N.input_layernorm             model.layers.N.input_layernorm
    transformer.encoder.layers.N.self_attention.query_key_value   model.layers.N.self_attn.qkv_proj ([q | k | v])
    transformer.encoder.layers.N.self_attention.dense        model.layers.N.self_attn.o_proj
    transformer.encoder.layers.N.post_attention_layernorm    model.layers.N.post_attention_layernorm
    transformer.encoder.layers.N.mlp.dense_h_to_4h           model.layers.N.mlp.gate_up_proj (already fused)
    transformer.encoder.layers.N.mlp.dense_4h_to_h           model.layers.N.mlp.down_proj
    transformer.encoder.final_layernorm                      model.norm
    transformer.output_layer                                 lm_head

and config fields: padded_vocab_size, ffn_hidden_size, num_layers, multi_query_group_num, kv_channels,
add_qkv_bias, layernorm_epsilon, seq_length, and rope_ratio (rope_theta = 10000 * rope_ratio). Their RoPE rotates
half of each head in adjacent pairs, which is GLM's partial_rotary_factor 0.5.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, GlmConfig
from .formats import Rule, WeightFormat

_LAYER = r"transformer\.encoder\.layers\.(\d+)\."


def split_qkv(tensor: torch.Tensor, config: GlmConfig) -> tuple[torch.Tensor, ...]:
    """The fused [q | k | v] rows (weight or bias) as three tensors, checked against the head counts: the
    loader stacks them again (reading each rank's heads under tensor parallelism), the converter writes them
    under transformers' names."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    if tensor.shape[0] != q + 2 * kv:
        raise ConfigError(f"query_key_value has {tensor.shape[0]} rows but the config implies {q} + 2 x {kv}; "
                          "num_attention_heads, multi_query_group_num or kv_channels is wrong")
    return tuple(tensor.split([q, kv, kv], dim=0))


THUDM = WeightFormat("THUDM chatglm", (
    Rule(r"transformer\.embedding\.word_embeddings\.weight", ("model.embed_tokens.weight",)),
    Rule(_LAYER + r"input_layernorm\.weight", (r"model.layers.\1.input_layernorm.weight",)),
    Rule(_LAYER + r"self_attention\.query_key_value\.(weight|bias)",
         (r"model.layers.\1.self_attn.qkv_proj.\2#q_proj", r"model.layers.\1.self_attn.qkv_proj.\2#k_proj",
          r"model.layers.\1.self_attn.qkv_proj.\2#v_proj"), split_qkv),
    Rule(_LAYER + r"self_attention\.dense\.weight", (r"model.layers.\1.self_attn.o_proj.weight",)),
    Rule(_LAYER + r"post_attention_layernorm\.weight", (r"model.layers.\1.post_attention_layernorm.weight",)),
    Rule(_LAYER + r"mlp\.dense_h_to_4h\.weight", (r"model.layers.\1.mlp.gate_up_proj.weight",)),
    Rule(_LAYER + r"mlp\.dense_4h_to_h\.weight", (r"model.layers.\1.mlp.down_proj.weight",)),
    Rule(r"transformer\.encoder\.final_layernorm\.weight", ("model.norm.weight",)),
    Rule(r"transformer\.output_layer\.weight", ("lm_head.weight",)),
    Rule(r"transformer\.rotary_pos_emb\.inv_freq", ()),  # computed, never loaded
))

# Fields whose other values describe a model GLM's math does not express.
_REQUIRED = {
    "rmsnorm": (True, "LayerNorm models (rmsnorm=false) are not supported"),
    "apply_residual_connection_post_layernorm": (False, "residuals taken after the norm are not supported"),
    "post_layer_norm": (True, "models without a final norm are not supported"),
    "add_bias_linear": (False, "bias on the dense/MLP projections is not supported"),
    "apply_query_key_layer_scaling": (None, None),
    "original_rope": (True, "only the original (interleaved, half-head) RoPE is supported"),
}


def config_from_thudm(data: dict[str, Any], **overrides: Any) -> GlmConfig:
    """Translate a THUDM config.json; a field glmtorch cannot honour is an error that names it."""
    for name, (wanted, why) in _REQUIRED.items():
        if why and name in data and bool(data[name]) != wanted:
            raise ConfigError(f"config.json {name}={data[name]!r}: {why}")
    if data.get("pre_seq_len"):
        raise ConfigError(f"config.json pre_seq_len={data['pre_seq_len']!r}: P-tuning prefix encoders are not "
                          "supported; merge or drop the prefix before loading")
    heads = data["num_attention_heads"]
    kv_heads = data.get("multi_query_group_num", heads) if data.get("multi_query_attention") else heads
    hidden = data["hidden_size"]
    eos = data.get("eos_token_id")
    glm = {
        "vocab_size": data.get("padded_vocab_size", data.get("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": data["ffn_hidden_size"],
        "num_hidden_layers": data["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": data.get("kv_channels"),  # None: GlmConfig derives hidden // heads once it has checked both
        "partial_rotary_factor": 0.5,
        "attention_bias": bool(data.get("add_qkv_bias", False)),
        "rms_norm_eps": data.get("layernorm_epsilon", 1e-5),
        "max_position_embeddings": data.get("seq_length", 8192),
        "rope_theta": 10000.0 * float(data.get("rope_ratio", 1)),
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", False)),
        "attention_dropout": data.get("attention_dropout", 0.0),
        "pad_token_id": data.get("pad_token_id"),
        "eos_token_id": eos,
        "dtype": data.get("torch_dtype"),
    }
    return GlmConfig.from_dict({k: v for k, v in glm.items() if v is not None}, **overrides)


def config_to_thudm(config: GlmConfig) -> dict[str, Any]:
    """The inverse translation (for tests and for writing original-format checkpoints)."""
    if config.partial_rotary_factor != 0.5:
        raise ConfigError(f"partial_rotary_factor={config.partial_rotary_factor}: the THUDM format rotates half of "
                          "each head only")
    return {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
        "add_qkv_bias": config.attention_bias, "apply_residual_connection_post_layernorm": False,
        "attention_dropout": config.attention_dropout, "ffn_hidden_size": config.intermediate_size,
        "hidden_size": config.hidden_size, "kv_channels": config.head_dim, "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": config.num_key_value_heads != config.num_attention_heads,
        "multi_query_group_num": config.num_key_value_heads, "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers, "original_rope": True, "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True, "rmsnorm": True, "rope_ratio": config.rope_theta / 10000.0,
        "seq_length": config.max_position_embeddings, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": config.dtype or "float32",
    }


def to_thudm_names(tensors: dict[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """transformers-format tensors renamed and fused into the original layout (the table, inverted)."""
    out: dict[str, torch.Tensor] = {}
    for n in range(config.num_hidden_layers):
        src, dst = f"model.layers.{n}.", f"transformer.encoder.layers.{n}."
        for kind in ("weight", "bias"):
            parts = [tensors.get(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if parts[0] is not None:
                out[f"{dst}self_attention.query_key_value.{kind}"] = torch.cat(parts, dim=0)
        out[f"{dst}self_attention.dense.weight"] = tensors[f"{src}self_attn.o_proj.weight"]
        out[f"{dst}input_layernorm.weight"] = tensors[f"{src}input_layernorm.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = tensors[f"{src}post_attention_layernorm.weight"]
        out[f"{dst}mlp.dense_h_to_4h.weight"] = tensors[f"{src}mlp.gate_up_proj.weight"]
        out[f"{dst}mlp.dense_4h_to_h.weight"] = tensors[f"{src}mlp.down_proj.weight"]
    out["transformer.embedding.word_embeddings.weight"] = tensors["model.embed_tokens.weight"]
    out["transformer.encoder.final_layernorm.weight"] = tensors["model.norm.weight"]
    out["transformer.output_layer.weight"] = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    return out
