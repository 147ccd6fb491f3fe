"""THUDM's original format: loading, converting (and converting back through transformers), .bin safety."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmtorch
from glmtorch import CheckpointError, ConfigError
from glmtorch.checkpoint.convert import convert_checkpoint
from glmtorch.checkpoint.thudm import config_to_thudm, to_thudm_names
from conftest import CONFIGS, build_bpe_tokenizer, make_hf_model, rel_err, write_tiktoken_file


def write_thudm_checkpoint(hf_model, path, shards=1, tokenizer=True, weights="safetensors"):
    """The inverse of glmtorch's table: rename and fuse a transformers GLM into THUDM's layout."""
    path.mkdir(parents=True, exist_ok=True)
    ours = glmtorch.GlmConfig.from_dict(hf_model.config.to_dict())
    (path / "config.json").write_text(json.dumps(config_to_thudm(ours)))
    tensors = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    original = to_thudm_names(tensors, ours)
    names = sorted(original)
    groups = [names[i::shards] for i in range(shards)]
    if weights == "bin":
        torch.save(original, path / "pytorch_model.bin")
    elif shards == 1:
        save_file(original, path / "model.safetensors")
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: original[k] for k in group}, path / name)
            weight_map.update({k: name for k in group})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer:
        write_tiktoken_file(build_bpe_tokenizer(), path / "tokenizer.model")
    return path


def ids():
    return torch.randint(1, 160, (2, 9), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("config_name", ["gqa", "mqa_wide_heads", "mha_full_rotary_nobias"])
@torch.no_grad()
def test_original_format_loads_with_identical_logits(tmp_path, config_name):
    cfg = dict(CONFIGS[config_name], partial_rotary_factor=0.5, rope_theta=10000.0 * 3)
    ref = make_hf_model(**cfg)
    path = write_thudm_checkpoint(ref, tmp_path / "orig", shards=3)
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.rope_theta == 30000.0
    assert rel_err(model(ids()).logits, ref(ids()).logits) < 1e-5
    tok = glmtorch.AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|user|>") is not None


@torch.no_grad()
def test_convert_output_loads_in_transformers(tmp_path):
    import transformers

    ref = make_hf_model(**dict(CONFIGS["gqa"], rope_theta=500000.0))
    src = write_thudm_checkpoint(ref, tmp_path / "orig")
    written = convert_checkpoint(str(src), str(tmp_path / "hf"), dtype="float32", max_shard_size="30KB")
    assert "model.safetensors.index.json" in written and "tokenizer.json" in written
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert rel_err(back(ids()).logits, ref(ids()).logits) < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    our_tok = glmtorch.AutoTokenizer.from_pretrained(src)
    assert hf_tok.encode("Hello world! 你好") == our_tok.encode("Hello world! 你好")
    again = glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert rel_err(again(ids()).logits, ref(ids()).logits) < 1e-5


def test_convert_command_bf16(tmp_path):
    src = write_thudm_checkpoint(make_hf_model(**CONFIGS["gqa"]), tmp_path / "orig", tokenizer=False)
    exe = os.path.join(os.path.dirname(sys.executable), "glmtorch")
    result = subprocess.run([exe, "convert", str(src), str(tmp_path / "out"), "--dtype", "bf16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    again = subprocess.run([exe, "convert", str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_bad_sources_leave_destination_untouched(tmp_path):
    ref = make_hf_model(**CONFIGS["gqa"])
    src = write_thudm_checkpoint(ref, tmp_path / "orig", shards=2, tokenizer=False)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_checkpoint(str(src), str(tmp_path / "dst"))
    shard.unlink()
    with pytest.raises(CheckpointError, match="not in"):
        convert_checkpoint(str(src), str(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst") and not list(tmp_path.glob("dst*"))

    wrong = write_thudm_checkpoint(ref, tmp_path / "wrong", tokenizer=False)
    tensors = load_file(wrong / "model.safetensors")
    tensors["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(5, 5)
    save_file(tensors, wrong / "model.safetensors")
    with pytest.raises(CheckpointError, match="has shape \\(5, 5\\)"):
        convert_checkpoint(str(wrong), str(tmp_path / "dst"))
    with pytest.raises(CheckpointError, match="has shape \\(5, 5\\)"):
        glmtorch.AutoModelForCausalLM.from_pretrained(wrong)
    assert not list(tmp_path.glob("dst*"))


def test_unsupported_original_fields_are_named(tmp_path):
    src = write_thudm_checkpoint(make_hf_model(**CONFIGS["gqa"]), tmp_path / "orig", tokenizer=False)
    config = json.loads((src / "config.json").read_text())
    for field, value in [("rmsnorm", False), ("add_bias_linear", True), ("pre_seq_len", 16)]:
        (src / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ConfigError, match=field):
            glmtorch.AutoModelForCausalLM.from_pretrained(src)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/glmtorch_pwned",))


@torch.no_grad()
def test_bin_weights_load_only_without_code(tmp_path):
    ref = make_hf_model(**CONFIGS["gqa"])
    src = write_thudm_checkpoint(ref, tmp_path / "bin", weights="bin", tokenizer=False)
    model = glmtorch.AutoModelForCausalLM.from_pretrained(src)
    assert rel_err(model(ids()).logits, ref(ids()).logits) < 1e-5
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((src / "config.json").read_text())
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        glmtorch.AutoModelForCausalLM.from_pretrained(evil)
    assert not os.path.exists("/tmp/glmtorch_pwned")


CONVERT_CHILD = r"""
import resource, sys
import glmtorch
from glmtorch.checkpoint.convert import convert_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="40MB", progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


@pytest.mark.slow
def test_convert_peak_memory_is_far_below_model_size(tmp_path):
    """A ~300 MB original-format checkpoint converts with a small fraction of that in extra memory."""
    config = glmtorch.GlmConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                                num_attention_heads=16, num_key_value_heads=2, head_dim=64, pad_token_id=0)
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_to_thudm(config)))
    g = torch.Generator().manual_seed(0)
    weight_map, total, shard, index = {}, 0, {}, 0

    def flush():
        nonlocal shard, index
        name = f"model-{index + 1:05d}-of-00099.safetensors"
        save_file(shard, src / name)
        weight_map.update({k: name for k in shard})
        shard, index = {}, index + 1

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in glmtorch.GlmForCausalLM(config).state_dict().items()}
    for name, tensor_shape in shapes.items():
        shard[name] = torch.randn(tensor_shape, generator=g) * 0.02
        total += shard[name].numel() * 4
        if sum(t.numel() * 4 for t in shard.values()) > 40e6:
            flush()
    flush()
    original = to_thudm_names(load_all(src, weight_map), config)
    for f in src.glob("model-*.safetensors"):
        f.unlink()
    weight_map = {}
    names = sorted(original)
    for i in range(8):
        name = f"model-{i + 1:05d}-of-00008.safetensors"
        save_file({k: original[k] for k in names[i::8]}, src / name)
        weight_map.update({k: name for k in names[i::8]})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    del original
    result = subprocess.run([sys.executable, "-c", CONVERT_CHILD, str(src), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.strip().splitlines()[-1])
    assert total > 250e6
    assert growth < 0.5 * total, (growth, total)


def load_all(src, weight_map):
    return {k: v for f in sorted(set(weight_map.values())) for k, v in load_file(src / f).items()}


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    from conftest import TOKENIZER_TEXT

    path = tmp_path_factory.mktemp("sp")
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT * 5))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path / "sp"), vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    return path / "sp.model"


@torch.no_grad()
def test_chatglm3_shaped_checkpoint_with_sentencepiece_tokenizer(tmp_path, sentencepiece_model):
    import shutil

    import sentencepiece as spm
    import transformers

    # ChatGLM3's shape in miniature: multi-query groups of 2, head_dim 32 (kv_channels), vocab padded past the
    # SentencePiece vocabulary plus its 9 special tokens, rope_ratio 1, eos 2 / pad 0.
    ref = make_hf_model(**dict(CONFIGS["gqa"], vocab_size=416, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=32, eos_token_id=2, pad_token_id=0))
    src = write_thudm_checkpoint(ref, tmp_path / "chatglm3", tokenizer=False)
    shutil.copy(sentencepiece_model, src / "tokenizer.model")
    model = glmtorch.AutoModelForCausalLM.from_pretrained(src)
    ids_in = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(5))
    assert rel_err(model(ids_in).logits, ref(ids_in).logits) < 1e-5

    tok = glmtorch.AutoTokenizer.from_pretrained(src)
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    for text in ["Hello world!", "To be, or not to be", "你好 café 123"]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.convert_tokens_to_ids("<|user|>") == 400 + 6 and tok.eos_token_id == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "[gMASK]sop<|user|>\n Hello<|assistant|>"
    out = model.generate(tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                                 return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4

    convert_checkpoint(str(src), str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.model")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert rel_err(back(ids_in).logits, ref(ids_in).logits) < 1e-5
    assert glmtorch.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("Hello world!") == sp.encode("Hello world!")


def test_converted_files_follow_the_umask(tmp_path):
    src = tmp_path / "src"
    make_hf_model(**CONFIGS["gqa"]).save_pretrained(src)
    old = os.umask(0o022)
    try:
        convert_checkpoint(src, tmp_path / "dst")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "dst").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


SLOW_CONVERT = """
import sys, time
import safetensors.torch
save = safetensors.torch.save_file
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)
safetensors.torch.save_file = slow_save
import glmtorch.checkpoint.convert as convert
convert.save_file = slow_save
from glmtorch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_convert_leaves_no_partial_files(tmp_path):
    import signal

    src = tmp_path / "src"
    make_hf_model(**CONFIGS["gqa"]).save_pretrained(src)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", str(src), str(tmp_path / "dst")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # a shard is on disk, in the .partial folder
    assert [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
