"""Shared fixtures: tiny random GLM checkpoints written by transformers (the reference) and by glmtorch."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Configs that differ where GLM implementations go wrong: kv grouping, rotary fraction, head size,
# biases, tied embeddings, activation.
CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5),
    "mqa_wide_heads": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, partial_rotary_factor=0.25),
    "mha_full_rotary_nobias": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                   partial_rotary_factor=1.0, attention_bias=False),
    "tied_narrow_heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    "six_heads_gelu": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                           hidden_act="gelu", rope_theta=500000.0),
}
BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
            pad_token_id=0, eos_token_id=[1, 2, 3], bos_token_id=None)


def hf_config(**changes):
    import transformers

    kw = {**BASE, **changes}
    return transformers.GlmConfig(**kw)


def make_hf_model(cls_name: str = "GlmForCausalLM", seed: int = 0, **changes):
    """A random transformers GLM model whose biases and norms are not trivially zero/one."""
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(hf_config(**changes))
    with torch.no_grad():  # reference init sets biases to 0 and norms to 1: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(model, path, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kw)
    return str(path)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


@pytest.fixture
def hf_checkpoint(tmp_path, config_name):
    """(transformers model, checkpoint directory) for each config."""
    model = make_hf_model(**CONFIGS[config_name])
    return model, save_hf(model, tmp_path / config_name)


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory):
    model = make_hf_model(**CONFIGS["gqa"])
    return model, save_hf(model, tmp_path_factory.mktemp("gqa"))
