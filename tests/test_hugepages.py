"""glmtorch.hugepages: large CPU weights move, in place, into memory backed by 2 MB pages, and nothing else about
the model changes (values, tying, saving, training); the memory goes when the tensor goes."""

import gc

import pytest
import torch

from glmtorch import GlmForCausalLM
from glmtorch.hugepages import HUGE_PAGE, huge_pages_available, move_weights_to_huge_pages

from conftest import make_hf_model, save_hf

pytestmark = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address`."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


@torch.no_grad()
def test_from_pretrained_puts_large_weights_in_huge_pages(tmp_path):
    # vocab 4096 x hidden 128 fp32: the embedding and the untied LM head are 2 MB each, the layers far smaller
    path = save_hf(make_hf_model(vocab_size=4096, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=32, intermediate_size=256), tmp_path / "m")
    model = GlmForCausalLM.from_pretrained(path)
    head = model.lm_head.weight
    assert head.data_ptr() % HUGE_PAGE == 0
    assert _huge_kb(head.data_ptr()) >= 2048  # backed by a huge page, not just aligned
    assert model.model.layers[0].mlp.down_proj.weight.data_ptr() % HUGE_PAGE != 0  # small ones stay
    # the untied embedding is read a row per token: left where it is, by the loader and by a later move
    assert _huge_kb(model.model.embed_tokens.weight.data_ptr()) == 0
    assert move_weights_to_huge_pages(model) == 0  # and the rest the loader wrote there: nothing copied twice
    quantized = GlmForCausalLM.from_pretrained(path, quantize="int8")  # quantized weights are moved after
    assert _huge_kb(quantized.model.embed_tokens.weight.data_ptr()) == 0
    ids = torch.tensor([[5, 6, 7, 4000]])
    plain = GlmForCausalLM.from_pretrained(path)
    for p in plain.parameters():
        p.data = p.data.clone()  # ordinary memory
    assert torch.equal(model(ids).logits, plain(ids).logits)


def test_moving_changes_nothing_but_the_memory(tmp_path):
    # tied: the embedding is the LM head too, so it moves
    model = GlmForCausalLM.from_pretrained(save_hf(make_hf_model(tie_word_embeddings=True), tmp_path / "tied"))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids).logits
    embedding = model.model.embed_tokens.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert move_weights_to_huge_pages(model, min_bytes=1) > 0
    assert model.model.embed_tokens.weight is embedding  # same Parameter objects: the optimizer still holds them
    assert model.lm_head.weight.data_ptr() == embedding.data_ptr()  # still tied
    assert embedding.data_ptr() % HUGE_PAGE == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    model.save_pretrained(tmp_path / "saved")  # safetensors sees no shared storage
    with torch.no_grad():
        assert torch.equal(GlmForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, before)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(embedding, GlmForCausalLM.from_pretrained(tmp_path / "saved").model.embed_tokens.weight)


def test_memory_is_unmapped_with_its_tensor():
    layer = torch.nn.Linear(1024, 1024)
    move_weights_to_huge_pages(layer)  # 4 MB weight; the 4 KB bias stays
    address = layer.weight.data_ptr()
    assert address % HUGE_PAGE == 0 and _mapped(address)
    del layer
    gc.collect()
    assert not _mapped(address)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("GLMTORCH_HUGE_PAGES", "0")
    layer = torch.nn.Linear(1024, 1024)
    address = layer.weight.data_ptr()
    assert move_weights_to_huge_pages(layer) == 0 and layer.weight.data_ptr() == address
