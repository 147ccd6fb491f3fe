"""The model on an accelerator (CUDA): parity with transformers on the same device, cached and compiled decoding,
bf16, the serving engine's paged KV cache, quantized weights, classification and a training step.

Skipped where no GPU is visible (CI has none). `GLMTORCH_TEST_DEVICE=cpu` runs the same checks on the CPU, which
checks the tests themselves where no GPU is at hand; `GLMTORCH_TEST_DEVICE=cuda:1` picks another GPU."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import glmtorch
from conftest import CONFIGS, make_hf_model, rel_err, save_hf
from conftest import padded_batch as conftest_padded_batch

DEVICE = os.environ.get("GLMTORCH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no GPU visible (GLMTORCH_TEST_DEVICE=cpu runs these here)")


def on_device(model):
    """A copy on the device: the session's shared reference models stay where they are."""
    return copy.deepcopy(model).to(DEVICE)


def padded_batch(**kw):
    ids, mask = conftest_padded_batch(**kw)
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture(params=sorted(CONFIGS))
def device_pair(request, tmp_path):
    """(transformers model on the device, glmtorch's from the same checkpoint loaded straight onto it)."""
    ref = make_hf_model(**CONFIGS[request.param])
    path = save_hf(ref, tmp_path / request.param)
    ours = glmtorch.GlmForCausalLM.from_pretrained(path, device=DEVICE)
    return on_device(ref), ours


@torch.no_grad()
def test_loaded_onto_the_device_and_logits_match_reference(device_pair):
    ref, ours = device_pair
    assert ours.device.type == torch.device(DEVICE).type
    assert all(p.device == ours.device for p in ours.parameters())
    ids, mask = padded_batch()
    real = mask.bool()  # a padding position's output is nobody's
    got, expected = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert rel_err(got[real], expected[real]) < 1e-5


@torch.no_grad()
def test_greedy_generation_of_a_padded_batch_matches_reference(device_pair):
    ref, ours = device_pair
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.slow
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")  # no eager fallback
@torch.no_grad()
def test_compiled_decode_step_matches_reference_and_does_not_recompile(gqa_checkpoint, monkeypatch):
    """The compiled step that every model of 50 MB or more decodes with on a GPU, replaying CUDA graphs."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("GLMTORCH_COMPILE", "1")
    ref, path = gqa_checkpoint
    ref = on_device(ref)
    ours = glmtorch.GlmForCausalLM.from_pretrained(path, device=DEVICE)
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=[], pad_token_id=0)
    skips = counters["inductor"]["cudagraph_skips"]
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))
    if torch.device(DEVICE).type == "cuda":  # the steps replayed CUDA graphs, not kernels launched one by one
        assert counters["inductor"]["cudagraph_skips"] == skips
    graphs = counters["stats"]["unique_graphs"]
    shorter, short_mask = ids[:, 2:], mask[:, 2:]  # another prompt length and output length, same graphs
    got = ours.generate(shorter, attention_mask=short_mask, **{**kw, "max_new_tokens": 7})
    assert torch.equal(got, ref.generate(shorter, attention_mask=short_mask, **{**kw, "max_new_tokens": 7}))
    assert counters["stats"]["unique_graphs"] == graphs


@torch.no_grad()
def test_bf16_within_reference_bf16_error(gqa_checkpoint):
    import transformers

    ref, path = gqa_checkpoint
    ids, mask = padded_batch()
    real = mask.bool()
    exact = on_device(ref)(ids, attention_mask=mask).logits[real]
    ref_bf16 = on_device(transformers.GlmForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    ours = glmtorch.GlmForCausalLM.from_pretrained(path, dtype="bf16", device=DEVICE)
    assert ours.dtype == torch.bfloat16
    ref_err = rel_err(ref_bf16(ids, attention_mask=mask).logits[real].float(), exact)
    our_err = rel_err(ours(ids, attention_mask=mask).logits[real].float(), exact)
    assert our_err <= 1.5 * ref_err + 1e-4, (our_err, ref_err)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantized_weights_equal_their_dequantized_matrices(gqa_checkpoint, mode):
    """A quantized model on the device computes what its layers define, x @ dequantized(W).T + b: a dense model
    holding those matrices gives the same logits and the same greedy tokens. Measured on an H200: the CPU's
    integer kernels sit ~7e-3 from it, as they round activations to int8 in blocks of 32 (llama.cpp's Q8_0), so
    the CPU is no reference here, and test_fastpath.py tests them."""
    from glmtorch.quantize import Int4Linear, Int8Linear

    if torch.device(DEVICE).type == "cpu":
        pytest.skip("on a CPU the integer kernels round activations to int8 (tested in test_fastpath.py)")

    _, path = gqa_checkpoint
    quantized = glmtorch.GlmForCausalLM.from_pretrained(path, quantize=mode, device=DEVICE)
    dense = glmtorch.GlmForCausalLM.from_pretrained(path, device=DEVICE)
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    assert layers
    for name, m in dense.named_modules():
        if name in layers:
            m.weight.copy_(layers[name].dequantized(torch.float32))
    ids, mask = padded_batch()
    real = mask.bool()
    expected = dense(ids, attention_mask=mask).logits[real]
    assert rel_err(quantized(ids, attention_mask=mask).logits[real], expected) < 1e-5
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(quantized.generate(ids, **kw), dense.generate(ids, **kw))


def test_the_engine_on_the_device_equals_each_request_alone(chat_checkpoint):
    """Continuous batching over the paged KV cache on the device: a batch, a pool too small for it (preemption),
    and a prefix-cache hit all give each request's output alone."""
    from glmtorch.serve.engine import SamplingParams

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path, device=DEVICE)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(5, 150, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (6,), generator=g)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    def run(llm, prompts):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    one = glmtorch.LLM(model, tokenizer, max_num_seqs=1, prefix_caching=False)
    alone = [run(one, [p])[0] for p in batch]
    llm = glmtorch.LLM(model, tokenizer)
    assert llm.engine.cache.key_buffer.device.type == torch.device(DEVICE).type
    assert run(llm, batch) == alone
    shared = [list(range(10, 58)) + p for p in batch[:3]]  # three whole blocks in common
    expected = [run(one, [p])[0] for p in shared]
    first = llm.generate(shared[:1], params, use_tqdm=False)
    rest = llm.generate(shared[1:], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens >= 48 for o in rest)
    small = glmtorch.LLM(model, tokenizer, max_num_seqs=6, kv_cache_memory=12 * model.kv_block_bytes(16),
                         prefix_caching=False)
    assert run(small, batch) == alone
    assert small.engine.preemptions > 0


def test_classification_heads_match_reference(tmp_path):
    ids, mask = padded_batch()
    for name in ("GlmForSequenceClassification", "GlmForTokenClassification"):
        ref = make_hf_model(name, **CONFIGS["gqa"], num_labels=3)
        path = save_hf(ref, tmp_path / name)
        ours = getattr(glmtorch, name).from_pretrained(path, device=DEVICE)
        with torch.no_grad():
            got, expected = ours(ids, attention_mask=mask).logits, on_device(ref)(ids, attention_mask=mask).logits
        if got.dim() == 3:  # per token: a padding position's label is nobody's
            got, expected = got[mask.bool()], expected[mask.bool()]
        assert rel_err(got, expected) < 1e-5, name


def test_a_training_step_matches_reference(gqa_checkpoint):
    """Loss and gradients of a padded batch equal transformers' on the device. Padded on the right, as for
    training: on the left, a padding position would predict the first real token, from an output that is
    nobody's."""
    ref, path = gqa_checkpoint
    ref = on_device(ref).train()
    ours = glmtorch.GlmForCausalLM.from_pretrained(path, device=DEVICE).train()
    ids, mask = padded_batch(side="right")
    labels = ids.masked_fill(mask == 0, -100)
    ours_loss = ours(ids, attention_mask=mask, labels=labels).loss
    ref_loss = ref(ids, attention_mask=mask, labels=labels).loss
    ours_loss.backward()
    ref_loss.backward()
    assert abs(ours_loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        parts = [name.replace("qkv_proj", x) for x in ("q_proj", "k_proj", "v_proj")] if "qkv_proj" in name else [name]
        assert rel_err(p.grad, torch.cat([ref_grads[part] for part in parts])) < 1e-4, name


@torch.no_grad()
def test_prompt_lookup_speculation_keeps_greedy_output(gqa_checkpoint):
    _, path = gqa_checkpoint
    ours = glmtorch.GlmForCausalLM.from_pretrained(path, device=DEVICE)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]], device=DEVICE)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(ours.generate(ids, prompt_lookup_num_tokens=4, **kw), ours.generate(ids, **kw))


@pytest.mark.skipif(DEVICE is None or not str(DEVICE).startswith("cuda"), reason="FlashAttention runs on CUDA only")
@torch.no_grad()
def test_flash_attention_matches_sdpa(gqa_checkpoint):
    pytest.importorskip("flash_attn")
    _, path = gqa_checkpoint
    sdpa = glmtorch.GlmForCausalLM.from_pretrained(path, dtype="bf16", device=DEVICE)
    flash = glmtorch.GlmForCausalLM.from_pretrained(path, dtype="bf16", device=DEVICE,
                                                    attn_implementation="flash_attention_2")
    ids = torch.randint(4, 160, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert rel_err(flash(ids).logits.float(), sdpa(ids).logits.float()) < 2e-2
