"""GlmConfig: defaults as the seed, both config.json spellings, round trips with transformers, clear errors."""

import json
import warnings

import pytest

import glmtorch
from glmtorch import ConfigError, GlmConfig

SEED_DEFAULTS = dict(
    vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=2, partial_rotary_factor=0.5, head_dim=128, hidden_act="silu", attention_dropout=0.0,
    max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1.5625e-07, use_cache=True,
    tie_word_embeddings=False, rope_theta=10000.0, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
    bos_token_id=None, attention_bias=True,
)


def test_defaults_are_the_seeds():
    config = GlmConfig()
    for name, value in SEED_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.rotary_dim == 64 and config.num_labels == 2 and config.problem_type is None


def test_reads_transformers_v4_spelling(tmp_path):
    v4 = {"model_type": "glm", "architectures": ["GlmForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "partial_rotary_factor": 0.25, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
          "pad_token_id": 0, "transformers_version": "4.46.0"}
    (tmp_path / "config.json").write_text(json.dumps(v4))
    config = glmtorch.AutoConfig.from_pretrained(tmp_path)
    assert (config.partial_rotary_factor, config.rope_theta, config.dtype) == (0.25, 500000.0, "bfloat16")


def test_reads_transformers_v5_spelling(tmp_path):
    v5 = {"model_type": "glm", "vocab_size": 1000, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
          "pad_token_id": 0, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0,
                                                  "partial_rotary_factor": 0.75}}
    (tmp_path / "config.json").write_text(json.dumps(v5))
    config = GlmConfig.from_pretrained(tmp_path)
    assert (config.partial_rotary_factor, config.rope_theta, config.rotary_dim) == (0.75, 20000.0, 12)


def test_written_config_loads_in_transformers(tmp_path):
    import transformers

    ours = GlmConfig(vocab_size=500, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                     partial_rotary_factor=0.25, rope_theta=12345.0, pad_token_id=3, tie_word_embeddings=True,
                     num_labels=3)
    ours.save_pretrained(tmp_path)
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(ref).__name__ == "GlmConfig"
    assert ref.rope_parameters["partial_rotary_factor"] == 0.25 and ref.rope_parameters["rope_theta"] == 12345.0
    assert (ref.head_dim, ref.num_key_value_heads, ref.tie_word_embeddings, ref.num_labels) == (24, 1, True, 3)
    again = GlmConfig.from_pretrained(tmp_path)
    assert again == ours


def test_transformers_written_config_round_trips(tmp_path):
    import transformers

    ref = transformers.GlmConfig(vocab_size=300, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                 head_dim=12, partial_rotary_factor=0.5, pad_token_id=1, attention_bias=False)
    ref.save_pretrained(tmp_path)
    ours = GlmConfig.from_pretrained(tmp_path)
    assert (ours.vocab_size, ours.head_dim, ours.num_key_value_heads, ours.attention_bias) == (300, 12, 3, False)


def test_unknown_keys_are_kept_not_dropped():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = GlmConfig.from_dict({"vocab_size": 100, "pad_token_id": 0, "my_new_field": 7})
    assert any("my_new_field" in str(w.message) for w in caught)
    assert config.to_dict()["my_new_field"] == 7


@pytest.mark.parametrize("changes,field", [
    (dict(num_attention_heads=32, num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=10, partial_rotary_factor=0.3), "partial_rotary_factor"),  # rotary dim 3: odd
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),  # larger than head_dim
    (dict(hidden_act="swiglu9"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn-ish", "factor": 2.0}), "rope_scaling"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=None, hidden_size=100, num_attention_heads=3), "hidden_size"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels"),
])
def test_contradictions_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"GlmConfig.{field}"):
        GlmConfig(**changes)


def test_bad_rope_type_in_v5_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm", "rope_parameters": {"rope_type": "nope"}}))
    with pytest.raises(ConfigError, match="unknown rope type 'nope'"):
        GlmConfig.from_pretrained(tmp_path)


def test_linear_rope_scaling_matches_reference(tmp_path):
    import torch
    import transformers

    from conftest import BASE, rel_err

    ref = transformers.GlmForCausalLM(transformers.GlmConfig(
        **BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
    ref.save_pretrained(tmp_path)
    ours = glmtorch.GlmForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = torch.randint(1, 160, (1, 20))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(ids).logits) < 1e-5


@pytest.mark.parametrize("changes, field", [
    (dict(num_hidden_layers=10**9), "num_hidden_layers"),  # was a hang while memory grew
    (dict(vocab_size=2**40), "vocab_size"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),  # was NaN logits
    (dict(rms_norm_eps=5e-324), "rms_norm_eps"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(attention_dropout=float("nan")), "attention_dropout"),
    (dict(pad_token_id=151552), "pad_token_id"),  # was a failure inside the C++ decode step
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(num_key_value_heads=64), "num_key_value_heads"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(max_position_embeddings=2.5), "max_position_embeddings"),
])
def test_every_number_has_a_declared_range(changes, field):
    with pytest.raises(ConfigError, match=f"GlmConfig.{field}"):
        GlmConfig(**changes)


def test_config_json_out_of_range_is_one_line_from_the_cli(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm", "num_hidden_layers": 1000000000}))
    exe = os.path.join(os.path.dirname(sys.executable), "glmtorch")
    result = subprocess.run([exe, "generate", str(tmp_path), "--prompt", "hi"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "num_hidden_layers" in result.stderr and "Traceback" not in result.stderr
