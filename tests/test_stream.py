"""checkpoint.stream: one pass over a checkpoint's tensors, with the same checks for the loader and the converter."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmtorch
from glmtorch import CheckpointError
from glmtorch.checkpoint.convert import convert_checkpoint
from glmtorch.checkpoint.formats import TRANSFORMERS
from glmtorch.checkpoint.stream import CheckpointStream
from conftest import CONFIGS, make_hf_model, save_hf


def test_stacked_parts_join_in_the_models_order(tmp_path):
    """stack=True gives qkv_proj whole, [q | k | v] whatever the order in the file; stack=False gives the parts
    under their own names."""
    path = save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path)
    tensors = load_file(f"{path}/model.safetensors")
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    stream = CheckpointStream([f"{path}/model.safetensors"], TRANSFORMERS, model.config, expected, stack=True)
    got = {name: t for name, t, _ in stream}
    stream.finish("test")
    qkv = got["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv, torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    unstacked = CheckpointStream([f"{path}/model.safetensors"], TRANSFORMERS, model.config,
                                 {n: tuple(t.shape) for n, t in tensors.items()}, stack=False)
    names = {name for name, _, _ in unstacked}
    unstacked.finish("test")
    assert names == set(tensors)


def test_loader_and_converter_report_the_same_problems_all_at_once(tmp_path):
    """A checkpoint with a missing part, an unknown tensor and a wrong shape: loading and converting each raise
    one CheckpointError naming all three, and the converter leaves nothing behind."""
    path = save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path / "ref")
    tensors = load_file(f"{path}/model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(5, 5)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    for attempt in (lambda: glmtorch.GlmForCausalLM.from_pretrained(path),
                    lambda: convert_checkpoint(path, str(tmp_path / "out"))):
        with pytest.raises(CheckpointError) as raised:
            attempt()
        message = str(raised.value)
        assert "model.layers.0.mystery.weight" in message
        assert "model.layers.0.self_attn.k_proj.weight" in message and "missing" in message
        assert "has shape (5, 5)" in message
    assert not list(tmp_path.glob("out*"))
