"""Loading and saving checkpoints: shards, round trips through transformers, dtype, and every bad input."""

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import glmtorch
from glmtorch import CheckpointError, ConfigError
from glmtorch.checkpoint import parse_size
from conftest import CONFIGS, make_hf_model, rel_err, save_hf


def ids():
    return torch.randint(1, 160, (2, 7), generator=torch.Generator().manual_seed(4))


@torch.no_grad()
def test_sharded_transformers_checkpoint_loads(tmp_path):
    ref = make_hf_model(**CONFIGS["gqa"])
    path = save_hf(ref, tmp_path / "sharded", max_shard_size="50KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    assert rel_err(model(ids()).logits, ref(ids()).logits) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("config_name", ["gqa", "tied_narrow_heads"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, config_name):
    import transformers

    ref = make_hf_model(**CONFIGS[config_name])
    ours = glmtorch.GlmForCausalLM.from_pretrained(save_hf(ref, tmp_path / "src"))
    names = ours.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    assert "model.safetensors.index.json" in names and len(names) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back).__name__ == "GlmForCausalLM"
    assert rel_err(back(ids()).logits, ref(ids()).logits) < 1e-5
    # Saving again unsharded replaces the shards instead of leaving a mix behind.
    ours.save_pretrained(tmp_path / "out")
    assert sorted(f for f in os.listdir(tmp_path / "out") if "safetensors" in f) == ["model.safetensors"]
    assert rel_err(glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "out")(ids()).logits, ref(ids()).logits) < 1e-5


def test_from_config_then_save_then_load(tmp_path):
    config = glmtorch.GlmConfig(vocab_size=160, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0)
    model = glmtorch.GlmForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    again = glmtorch.GlmForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(model(ids()).logits, again(ids()).logits)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["GlmForCausalLM"] and saved["model_type"] == "glm"


def test_dtype_auto_torch_dtype_and_device_map(tmp_path, gqa_checkpoint):
    ref, _ = gqa_checkpoint
    path = save_hf(copy.deepcopy(ref).to(torch.bfloat16), tmp_path / "bf16")
    assert glmtorch.GlmForCausalLM.from_pretrained(path).dtype == torch.bfloat16  # "auto" by default
    assert glmtorch.GlmForCausalLM.from_pretrained(path, torch_dtype=torch.float32).dtype == torch.float32
    model = glmtorch.GlmForCausalLM.from_pretrained(path, dtype="float16", device_map="auto", trust_remote_code=True)
    assert model.dtype == torch.float16 and model.device.type == glmtorch.infer_device()


def test_lm_checkpoint_loads_as_base_model_and_base_as_lm_is_an_error(tmp_path, gqa_checkpoint):
    ref, path = gqa_checkpoint
    base = glmtorch.AutoModel.from_pretrained(path)
    assert type(base).__name__ == "GlmModel"
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(CheckpointError, match="missing tensors: lm_head.weight"):
        glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "base")


def test_nonexistent_path_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        glmtorch.GlmForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="got a file"):
        glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "file.txt")


def test_hub_id_offline_says_what_to_do():
    with pytest.raises(CheckpointError, match="huggingface-cli download THUDM/glm-4-9b-chat-hf"):
        glmtorch.AutoModelForCausalLM.from_pretrained("THUDM/glm-4-9b-chat-hf")


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_and_corrupt_safetensors(tmp_path, gqa_checkpoint):
    _, path = gqa_checkpoint
    bad = copy_checkpoint(path, tmp_path / "truncated")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        glmtorch.GlmForCausalLM.from_pretrained(bad)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        glmtorch.GlmForCausalLM.from_pretrained(bad)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        glmtorch.GlmForCausalLM.from_pretrained(bad)


def test_corrupt_config_json(tmp_path, gqa_checkpoint):
    _, path = gqa_checkpoint
    bad = copy_checkpoint(path, tmp_path / "badconfig")
    (bad / "config.json").write_text('{"vocab_size": 160, ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        glmtorch.GlmForCausalLM.from_pretrained(bad)
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="model_type='llama'"):
        glmtorch.GlmForCausalLM.from_pretrained(bad)


def test_missing_shard(tmp_path):
    path = save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted(f for f in os.listdir(path) if f.startswith("model-"))
    os.remove(os.path.join(path, shards[1]))
    with pytest.raises(CheckpointError, match="names shard.*not in"):
        glmtorch.GlmForCausalLM.from_pretrained(path)


def load_error_after(edit, path, dest) -> str:
    """The CheckpointError message of loading a copy of `path` whose tensors `edit` changed."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    bad = copy_checkpoint(path, dest)
    edit(tensors)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        glmtorch.GlmForCausalLM.from_pretrained(bad)
    return str(info.value)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, gqa_checkpoint):
    def edit(tensors):
        tensors.pop("model.layers.1.mlp.down_proj.weight")
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    message = load_error_after(edit, gqa_checkpoint[1], tmp_path / "bad")
    assert "model.layers.1.mlp.down_proj.weight" in message
    assert "has shape (3, 3)" in message
    assert "unexpected tensor 'model.layers.0.self_attn.extra.weight'" in message


def test_missing_or_repeated_part_of_the_fused_qkv(tmp_path, gqa_checkpoint):
    """q, k and v load into one stacked qkv_proj: a part that is missing is named, as is a mis-shaped one."""
    def edit(tensors):
        tensors.pop("model.layers.1.self_attn.k_proj.weight")
        tensors["model.layers.0.self_attn.v_proj.bias"] = torch.zeros(3, 2)

    message = load_error_after(edit, gqa_checkpoint[1], tmp_path / "bad_qkv")
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in message
    assert "'model.layers.0.self_attn.v_proj.bias' has shape (3, 2)" in message


def test_config_that_does_not_match_weights(tmp_path, gqa_checkpoint):
    _, path = gqa_checkpoint
    bad = copy_checkpoint(path, tmp_path / "mismatch")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json does not match the weights"):
        glmtorch.GlmForCausalLM.from_pretrained(bad)


def test_bad_arguments(gqa_checkpoint):
    _, path = gqa_checkpoint
    with pytest.raises(ValueError, match="dtype='int3'"):
        glmtorch.GlmForCausalLM.from_pretrained(path, dtype="int3")
    with pytest.raises(ValueError, match="attn_implementation='fast'"):
        glmtorch.GlmForCausalLM.from_pretrained(path, attn_implementation="fast")
    with pytest.raises(ValueError, match="flash"):
        glmtorch.GlmForCausalLM.from_pretrained(path, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="not a device torch knows"):
        glmtorch.GlmForCausalLM.from_pretrained(path, device="warp9")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")
