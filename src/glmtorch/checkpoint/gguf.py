"""GGUF files of llama.cpp's `chatglm` (GLM-4-9B) and `glm4` (GLM-4-0414, GLM-Z1) architectures, read and written
through the `gguf` package (optional).

Names (one table, both directions):

    GGUF                        ours
    token_embd                  model.embed_tokens
    blk.N.attn_norm             model.layers.N.input_layernorm
    blk.N.attn_qkv (+ bias)     model.layers.N.self_attn.qkv_proj ([q | k | v], as in THUDM's format; chatglm)
    blk.N.attn_q/k/v (+ bias)   the same matrix's three parts (glm4, as llama.cpp's converter writes it)
    blk.N.attn_output           model.layers.N.self_attn.o_proj
    blk.N.post_attention_norm   model.layers.N.post_self_attn_layernorm (glm4)
    blk.N.ffn_norm              model.layers.N.post_attention_layernorm
    blk.N.ffn_up                model.layers.N.mlp.gate_up_proj ([gate | up], llama.cpp's SWIGLU split)
    blk.N.ffn_down              model.layers.N.mlp.down_proj
    blk.N.post_ffw_norm         model.layers.N.post_mlp_layernorm (glm4)
    output_norm                 model.norm
    output                      lm_head (absent when tied)

Quantized tensors (Q8_0, Q4_0, k-quants...) are dequantized by the gguf package on load. The tokenizer
travels inside the file (tokens, merges, token types) and is rebuilt as GLM-4's byte-level BPE.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import ConfigError, Glm4Config, GlmConfig
from ..extras import require
from .formats import Rule, WeightFormat
from .resolve import CheckpointError
from .safetensors_io import WEIGHT_READERS
from .thudm import split_qkv

ARCH = "chatglm"  # GLM-4-9B; GLM-4-0414 (a config with sandwich norms) is written as "glm4"
ARCHES = {"chatglm": GlmConfig, "glm4": Glm4Config}
_QKV = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}

GGUF_FORMAT = WeightFormat("GGUF chatglm / glm4", (
    Rule(r"token_embd\.weight", ("model.embed_tokens.weight",)),
    Rule(r"blk\.(\d+)\.attn_norm\.weight", (r"model.layers.\1.input_layernorm.weight",)),
    Rule(r"blk\.(\d+)\.attn_qkv\.(weight|bias)", (r"model.layers.\1.self_attn.qkv_proj.\2#q_proj",
                                                  r"model.layers.\1.self_attn.qkv_proj.\2#k_proj",
                                                  r"model.layers.\1.self_attn.qkv_proj.\2#v_proj"), split_qkv),
    *(Rule(rf"blk\.(\d+)\.attn_{part}\.(weight|bias)", (rf"model.layers.\1.self_attn.qkv_proj.\2#{name}",))
      for part, name in _QKV.items()),
    Rule(r"blk\.(\d+)\.attn_output\.weight", (r"model.layers.\1.self_attn.o_proj.weight",)),
    Rule(r"blk\.(\d+)\.post_attention_norm\.weight", (r"model.layers.\1.post_self_attn_layernorm.weight",)),
    Rule(r"blk\.(\d+)\.post_ffw_norm\.weight", (r"model.layers.\1.post_mlp_layernorm.weight",)),
    Rule(r"blk\.(\d+)\.ffn_norm\.weight", (r"model.layers.\1.post_attention_layernorm.weight",)),
    Rule(r"blk\.(\d+)\.ffn_up\.weight", (r"model.layers.\1.mlp.gate_up_proj.weight",)),
    Rule(r"blk\.(\d+)\.ffn_down\.weight", (r"model.layers.\1.mlp.down_proj.weight",)),
    Rule(r"output_norm\.weight", ("model.norm.weight",)),
    Rule(r"output\.weight", ("lm_head.weight",)),
    Rule(r"rope_freqs\.weight", ()),
))


def _gguf():
    """The gguf package (it brings numpy), or a one-line error naming the extra that installs it."""
    return require("gguf", "reading or writing GGUF files")


def is_gguf(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".gguf")


class GgufFile:
    """A GGUF file as a tensor source: keys(), shape(name), get_tensor(name) (dequantized to float32)."""

    def __init__(self, path: str) -> None:
        gguf = _gguf()
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e}); it is truncated or corrupt") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        value = f.contents()
        return value

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def get_tensor(self, name: str) -> torch.Tensor:
        gguf = _gguf()
        t = self.tensors[name]
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {t.tensor_type.name}, which the gguf package "
                                  "cannot dequantize") from None
        return torch.tensor(data, dtype=torch.float32).reshape(self.shape(name))


WEIGHT_READERS[".gguf"] = GgufFile  # the loader's and converter's file reader for .gguf weight files


def gguf_config(handle: GgufFile, **overrides: Any) -> GlmConfig:
    arch = handle.field("general.architecture")
    if arch not in ARCHES:
        raise ConfigError(f"{handle.path}: general.architecture is {arch!r}; glmtorch reads llama.cpp's 'chatglm' "
                          "(GLM-4-9B / ChatGLM) and 'glm4' (GLM-4-0414 / GLM-Z1) GGUF files")

    def need(key: str, default: Any = None, kind: type = int):
        """A metadata number, checked where it is read: a count of 0 must be an error naming the key, not a
        ZeroDivisionError two lines later."""
        value = handle.field(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"{handle.path}: GGUF metadata {arch}.{key} is missing")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, bool) or (kind is int and (number != value or number < 1)):
            raise ConfigError(f"{handle.path}: GGUF metadata {arch}.{key}={value!r} must be a positive integer")
        return number

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = need("attention.key_length", hidden // heads)
    rope_dims = need("rope.dimension_count", head_dim // 2)
    eos = [handle.field(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id")]
    eos = sorted({int(e) for e in eos if e is not None})
    names = set(handle.keys())
    fields = dict(
        vocab_size=handle.shape("token_embd.weight")[0],
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=need("attention.head_count_kv", heads),
        head_dim=head_dim,
        partial_rotary_factor=rope_dims / head_dim,
        rms_norm_eps=need("attention.layer_norm_rms_epsilon", kind=float),
        max_position_embeddings=need("context_length"),
        rope_theta=need("rope.freq_base", 10000.0, kind=float),
        attention_bias="blk.0.attn_qkv.bias" in names or "blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        eos_token_id=eos or None,
        pad_token_id=handle.field("tokenizer.ggml.padding_token_id"),
    )
    return ARCHES[arch].from_dict(fields, **overrides)


def gguf_tokenizer(path: str):
    """The tokenizer stored in a GGUF file, as a GlmTokenizer (byte-level BPE with GLM-4's split)."""
    from ..tokenizer import GlmTokenizer, byte_level_bpe

    handle = GgufFile(path)
    tokens = handle.field("tokenizer.ggml.tokens")
    merges = handle.field("tokenizer.ggml.merges")
    types = handle.field("tokenizer.ggml.token_type")
    if not tokens or merges is None or handle.field("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{path}: carries no byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2' with merges)")
    vocab = {token: i for i, token in enumerate(tokens)}
    control = [t for t, kind in zip(tokens, types) if int(kind) == 3]
    tok = byte_level_bpe(vocab, [tuple(m.split(" ", 1)) for m in merges], control)
    eos = handle.field("tokenizer.ggml.eos_token_id")
    pad = handle.field("tokenizer.ggml.padding_token_id")
    template = handle.field("tokenizer.chat_template")
    return GlmTokenizer(tok, chat_template=template, eos_token=tokens[int(eos)] if eos is not None else None,
                        pad_token=tokens[int(pad)] if pad is not None else None, name_or_path=path)


# -- writing -------------------------------------------------------------------------------------------------
GGUF_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def write_gguf(model, tokenizer, path: str, file_type: str = "f32", progress: bool | None = None) -> None:
    """Write `model` (a GlmForCausalLM, or Glm4ForCausalLM: llama.cpp's `glm4`) and its tokenizer as a llama.cpp
    `chatglm` / `glm4` GGUF file, named as llama.cpp's own converter names them.

    Norms and biases stay F32 (as llama.cpp's converter keeps them); matrices take `file_type`. Quantized
    types need rows whose length divides into blocks of 32 (else the matrix stays F16).
    """
    from tqdm.auto import tqdm

    gguf = _gguf()
    import numpy as np  # installed with gguf

    if file_type not in GGUF_TYPES:
        raise ValueError(f"--type {file_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[file_type])
    config = model.config
    if config.rope_scaling:
        raise ConfigError("rope_scaling is not expressible in a chatglm GGUF file")
    arch = "glm4" if config.sandwich_norms else ARCH
    _bpe_model(tokenizer, path)  # before a byte is written: a file llama.cpp cannot load is no file
    tmp = f"{path}.partial-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(os.path.basename(getattr(model, "name_or_path", "") or "glm"))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(config.rotary_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, {"f32": "ALL_F32", "f16": "MOSTLY_F16",
                                                               "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                                                               "q4_0": "MOSTLY_Q4_0"}[file_type])))
        _write_tokenizer(writer, gguf, tokenizer, config, arch)
        tensors = _gguf_tensors(model)
        for name, tensor in tqdm(tensors.items(), desc="Writing GGUF", unit="tensor",
                                 disable=None if progress is None else not progress):
            data = tensor.detach().float().cpu().numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, data.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            elif data.shape[-1] % 32:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                q = gguf.quants.quantize(data, qtype)
                writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _gguf_tensors(model) -> dict[str, torch.Tensor]:
    config = model.config
    sd = model.state_dict()
    for name, module in model.named_modules():  # quantized layers (int8 / int4) are written from their values
        if hasattr(module, "dequantized"):
            sd[f"{name}.weight"] = module.dequantized(torch.float32)
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        out[f"blk.{n}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        qkv = model.get_submodule(p + "self_attn.qkv_proj")  # already [q | k | v], as attn_qkv wants
        weight = qkv.dequantized(torch.float32) if hasattr(qkv, "dequantized") else qkv.weight.detach()
        bias = qkv.bias.detach() if config.attention_bias else None
        if config.sandwich_norms:  # glm4: q, k and v apart (llama.cpp's converter writes them so)
            sizes = model.get_submodule(p + "self_attn").qkv_sizes
            for part, rows in zip("qkv", weight.split(sizes)):
                out[f"blk.{n}.attn_{part}.weight"] = rows
            for part, rows in zip("qkv", bias.split(sizes) if bias is not None else ()):
                out[f"blk.{n}.attn_{part}.bias"] = rows
        else:
            out[f"blk.{n}.attn_qkv.weight"] = weight
            if bias is not None:
                out[f"blk.{n}.attn_qkv.bias"] = bias
        out[f"blk.{n}.attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"blk.{n}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[f"blk.{n}.ffn_up.weight"] = sd[p + "mlp.gate_up_proj.weight"]
        out[f"blk.{n}.ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
        if config.sandwich_norms:
            out[f"blk.{n}.post_attention_norm.weight"] = sd[p + "post_self_attn_layernorm.weight"]
            out[f"blk.{n}.post_ffw_norm.weight"] = sd[p + "post_mlp_layernorm.weight"]
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def _bpe_model(tokenizer, path: str = "") -> dict:
    """The tokenizer's BPE model (vocab, merges): what a chatglm / glm4 GGUF file carries and llama.cpp rebuilds.
    Another kind (a WordLevel test tokenizer) would give a file llama.cpp refuses to load ("cannot find tokenizer
    merges"): refused here instead."""
    import json

    model = json.loads(tokenizer.backend.to_str())["model"]
    if model.get("type") != "BPE" or not model.get("merges"):
        raise CheckpointError(f"{path or 'GGUF'}: llama.cpp's GLM files carry a byte-level BPE tokenizer (vocabulary "
                              f"and merges); this checkpoint's tokenizer is {model.get('type')!r} without merges, "
                              "which llama.cpp cannot load. Convert a checkpoint with GLM's tokenizer")
    return model


def _write_tokenizer(writer, gguf, tokenizer, config, arch: str = ARCH) -> None:
    """GLM-4's tokenizer the way llama.cpp's converter writes it: byte-level BPE ('gpt2'), pre 'chatglm-bpe',
    rows of a padded vocabulary as [PADn] placeholders; the beginning token [gMASK] for chatglm, <|endoftext|> for
    glm4 (as its converter sets them)."""
    model = _bpe_model(tokenizer)
    vocab = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    special = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i in special:
            tokens.append(special[i].content)
            types.append(gguf.TokenType.CONTROL)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    stop = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "[gMASK]"])
    if stop[0] is not None:
        writer.add_eos_token_id(stop[0])
        writer.add_unk_token_id(stop[0])
    if stop[1] is not None:
        writer.add_eot_token_id(stop[1])
    bos = stop[0] if arch == "glm4" else stop[2]
    if bos is not None:
        writer.add_bos_token_id(bos)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
