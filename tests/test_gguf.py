"""GGUF (llama.cpp's chatglm architecture): import through the gguf package, and our exporter round trip."""

import json
import os

import numpy as np
import pytest
import torch

import glmtorch
from conftest import CONFIGS, make_hf_model, rel_err
from glmtorch.tokenizer import train_bpe_tokenizer
from conftest import TOKENIZER_TEXT

gguf = pytest.importorskip("gguf")


def write_reference_gguf(hf_model, tokenizer, path, quantize_matrices=False):
    """Written here with the gguf package's writer, following llama.cpp's converter (not glmtorch's exporter)."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "chatglm")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(int(c.head_dim * c.rope_parameters["partial_rotary_factor"]))
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    model = json.loads(tokenizer.backend.to_str())["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    special = tokenizer.backend.get_added_tokens_decoder()
    tokens = [special[i].content if i in special else by_id.get(i, f"[PAD{i}]") for i in range(c.vocab_size)]
    types = [3 if i in special else (1 if i in by_id else 5) for i in range(c.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("chatglm-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if not isinstance(m, str) else m for m in model["merges"]])
    w.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    w.add_eot_token_id(tokenizer.convert_tokens_to_ids("<|user|>"))
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}

    def put(name, array):
        if quantize_matrices and array.ndim == 2:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array.astype(np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        put(f"blk.{n}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{n}.attn_qkv.weight", np.concatenate([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        put(f"blk.{n}.attn_qkv.bias", np.concatenate([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
        put(f"blk.{n}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{n}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{n}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        put(f"blk.{n}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TOKENIZER_TEXT, 414)


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    # hidden 64 and intermediate 96: rows divide into Q8_0 blocks of 32
    return make_hf_model(**dict(CONFIGS["gqa"], vocab_size=tokenizer.vocab_size, pad_token_id=0))


def ids():
    return torch.randint(1, 400, (2, 9), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_f32_gguf_loads_exactly_with_its_tokenizer(tmp_path, tokenizer, hf_model):
    path = write_reference_gguf(hf_model, tokenizer, tmp_path / "m.gguf")
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.partial_rotary_factor == 0.5 and model.config.num_key_value_heads == 2
    assert rel_err(model(ids()).logits, hf_model(ids()).logits) < 1e-6
    tok = glmtorch.AutoTokenizer.from_pretrained(path)
    for text in TOKENIZER_TEXT[:6] + ["[gMASK]<sop><|user|>\nhi"]:
        assert tok.encode(text) == tokenizer.encode(text)
    assert tok.eos_token_id == tokenizer.eos_token_id


@torch.no_grad()
def test_q8_0_gguf_within_quantization_error(tmp_path, tokenizer, hf_model):
    path = write_reference_gguf(hf_model, tokenizer, tmp_path / "q8.gguf", quantize_matrices=True)
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    err = rel_err(model(ids()).logits, hf_model(ids()).logits)
    assert 0 < err < 2e-2, err


@torch.no_grad()
@pytest.mark.parametrize("kind,tolerance", [("f32", 1e-6), ("bf16", 2e-2), ("q8_0", 2e-2), ("q4_0", 3e-1)])
def test_export_round_trips_through_import(tmp_path, tokenizer, hf_model, kind, tolerance):
    from glmtorch.checkpoint.gguf import write_gguf

    ours = glmtorch.GlmForCausalLM.from_pretrained(_save(hf_model, tmp_path / "hf"))
    write_gguf(ours, tokenizer, str(tmp_path / f"m-{kind}.gguf"), kind, progress=False)
    back = glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / f"m-{kind}.gguf")
    assert rel_err(back(ids()).logits, ours(ids()).logits) < tolerance
    assert glmtorch.AutoTokenizer.from_pretrained(tmp_path / f"m-{kind}.gguf").encode("Hello 你好") == tokenizer.encode("Hello 你好")


def test_a_tokenizer_llama_cpp_cannot_load_is_refused_before_writing(tmp_path, hf_model):
    """A WordLevel tokenizer (no merges) would make a file llama.cpp refuses ("cannot find tokenizer merges")."""
    from tokenizers import Tokenizer, models

    from glmtorch.checkpoint.gguf import write_gguf
    from glmtorch.checkpoint.resolve import CheckpointError

    words = glmtorch.GlmTokenizer(Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")))
    ours = glmtorch.GlmForCausalLM.from_pretrained(_save(hf_model, tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="'WordLevel' without merges, which llama.cpp cannot load"):
        write_gguf(ours, words, str(tmp_path / "m.gguf"), "f32", progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("m.gguf")]


@pytest.mark.parametrize("mode,kind", [("int8", "q8_0"), ("int4", "q4_0")])
def test_quantized_model_exports_its_values(tmp_path, tokenizer, hf_model, mode, kind):
    """A model loaded with quantize= writes full-shape matrices (its dequantized values), not packed bytes."""
    from glmtorch.checkpoint.gguf import write_gguf

    quant = glmtorch.GlmForCausalLM.from_pretrained(_save(hf_model, tmp_path / "hf"), quantize=mode)
    write_gguf(quant, tokenizer, str(tmp_path / "q.gguf"), kind, progress=False)
    back = glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / "q.gguf")
    assert back.lm_head.weight.shape == (hf_model.config.vocab_size, hf_model.config.hidden_size)
    # int4 is on Q4_0's grid (only the fp16 block scales round); int8's per-row grid is requantized in blocks
    tolerance = 1e-3 if mode == "int4" else 1e-2
    for name in ("lm_head", "model.layers.0.mlp.down_proj"):
        exact = quant.get_submodule(name).dequantized(torch.float32)
        assert rel_err(back.get_submodule(name).weight, exact) < tolerance
    # the file also quantizes the embedding matrix, as llama.cpp's own Q8_0 / Q4_0 files do
    assert rel_err(back(ids()).logits, quant(ids()).logits) < 0.1


def test_bad_gguf_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(glmtorch.CheckpointError, match="truncated or corrupt"):
        glmtorch.AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(glmtorch.CheckpointError, match="no such file"):
        glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / "missing.gguf")


def _save(model, path):
    from conftest import save_hf

    return save_hf(model, path)


@pytest.mark.parametrize("key", ["head_count", "block_count", "embedding_length"])
def test_zero_counts_in_gguf_metadata_name_the_key(tmp_path, tokenizer, hf_model, key):
    path = tmp_path / "zero.gguf"
    original = getattr(gguf.GGUFWriter, f"add_{key}")
    try:  # the reference writer, with one count written as 0
        setattr(gguf.GGUFWriter, f"add_{key}", lambda self, value: original(self, 0))
        write_reference_gguf(hf_model, tokenizer, path)
    finally:
        setattr(gguf.GGUFWriter, f"add_{key}", original)
    with pytest.raises(glmtorch.ConfigError, match=f"chatglm.*{key.split('_')[0]}.*must be a positive integer"):
        glmtorch.AutoModelForCausalLM.from_pretrained(path)


@torch.no_grad()
@pytest.mark.parametrize("kind,tolerance", [("f32", 1e-6), ("q8_0", 2e-2)])
def test_glm4_0414_exports_as_llama_cpp_glm4_and_reads_back(tmp_path, tokenizer, kind, tolerance):
    """GLM-4-0414's layer goes out in llama.cpp's `glm4` architecture, named as its converter names it (q, k, v
    apart; post_attention_norm and post_ffw_norm for the sandwich norms), and reads back as a Glm4ForCausalLM."""
    from glmtorch.checkpoint.gguf import GgufFile, write_gguf

    ref = make_hf_model("Glm4ForCausalLM", **dict(CONFIGS["gqa"], vocab_size=tokenizer.vocab_size, pad_token_id=0))
    ours = glmtorch.AutoModelForCausalLM.from_pretrained(_save(ref, tmp_path / "hf"))
    path = str(tmp_path / f"glm4-{kind}.gguf")
    write_gguf(ours, tokenizer, path, kind, progress=False)
    handle = GgufFile(path)
    assert handle.field("general.architecture") == "glm4" and handle.field("glm4.rope.dimension_count") == 8
    names = set(handle.keys())
    assert {"blk.1.attn_q.weight", "blk.1.attn_k.bias", "blk.1.post_attention_norm.weight",
            "blk.1.post_ffw_norm.weight"} <= names and "blk.0.attn_qkv.weight" not in names
    back = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    assert type(back) is glmtorch.Glm4ForCausalLM
    assert rel_err(back(ids()).logits, ref(ids()).logits) < tolerance
