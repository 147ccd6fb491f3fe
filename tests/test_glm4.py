"""GLM-4-0414 / GLM-Z1 (transformers' `glm4`): the same model file with the two sandwich norms, checked against
transformers' Glm4* classes on the same random weights across the odd configs: logits, padding, cached decoding,
heads and losses, greedy generate, save_pretrained read back by transformers, the fused CPU step."""

import json
import os
import warnings

import pytest
import torch

import glmtorch
from conftest import CONFIGS, make_hf_model, padded_batch, rel_err, save_hf

TOL = 1e-5


@pytest.fixture
def glm4_checkpoint(tmp_path, config_name):
    model = make_hf_model("Glm4ForCausalLM", **CONFIGS[config_name])
    return model, save_hf(model, tmp_path / config_name)


@pytest.fixture(scope="module")
def gqa_glm4(tmp_path_factory):
    model = make_hf_model("Glm4ForCausalLM", **CONFIGS["gqa"])
    return model, save_hf(model, tmp_path_factory.mktemp("glm4"))


def test_config_defaults_and_fields_match_reference():
    import transformers

    ours, ref = glmtorch.Glm4Config(), transformers.Glm4Config()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "pad_token_id", "eos_token_id", "attention_bias"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours.partial_rotary_factor == ref.rope_parameters["partial_rotary_factor"] == 0.5
    assert ours.model_type == "glm4" and ours.sandwich_norms and not glmtorch.GlmConfig().sandwich_norms
    assert ours.to_dict()["model_type"] == "glm4"
    assert type(ours.copy(hidden_size=64, intermediate_size=32, num_hidden_layers=1)) is glmtorch.Glm4Config


def test_config_json_both_spellings(tmp_path):
    """The released GLM-4-9B-0414's config.json (transformers 4.x keys) and the 5.x rope_parameters spelling."""
    v4 = {"model_type": "glm4", "architectures": ["Glm4ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "vocab_size": 160, "pad_token_id": 0, "rms_norm_eps": 1e-05, "max_position_embeddings": 32768,
          "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "torch_dtype": "bfloat16"}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "partial_rotary_factor")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    configs = []
    for name, data in (("v4", v4), ("v5", v5)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(data))
        configs.append(glmtorch.AutoConfig.from_pretrained(tmp_path / name))
    assert configs[0] == configs[1] and type(configs[0]) is glmtorch.Glm4Config
    assert configs[0].rms_norm_eps == 1e-05 and configs[0].max_position_embeddings == 32768
    with pytest.raises(glmtorch.ConfigError, match="model_type='glm4'.*GlmConfig reads 'glm'"):
        glmtorch.GlmConfig.from_dict(v4)


@torch.no_grad()
def test_logits_match_reference(glm4_checkpoint):
    ref_model, path = glm4_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    assert type(model) is glmtorch.Glm4ForCausalLM
    assert model.model.layers[0].post_mlp_layernorm.weight.std() > 0  # loaded, not left at its init
    ids = torch.randint(1, 160, (2, 11), generator=torch.Generator().manual_seed(0))
    err = rel_err(model(ids).logits, ref_model(ids).logits)
    assert err < TOL, err
    ours, theirs = model.state_dict(), ref_model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in theirs)


@torch.no_grad()
def test_padded_batch_cached_decode_and_hidden_states(gqa_glm4):
    ref_model, path = gqa_glm4
    model = glmtorch.Glm4ForCausalLM.from_pretrained(path)
    ids, mask = padded_batch(lengths=(10, 7, 4))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    full = model(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    ref = ref_model(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    assert rel_err(full.logits[real], ref.logits[real]) < TOL
    for h, r in zip(full.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(h[real], r[real]) < TOL
    out = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                    past_key_values=cache)
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1)[real], full.logits[real]) < TOL


@torch.no_grad()
def test_greedy_generate_matches_reference(gqa_glm4):
    ref_model, path = gqa_glm4
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    ids, mask = padded_batch(lengths=(6, 4))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ref_model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), ref)


@torch.no_grad()
def test_heads_and_losses_match_reference(tmp_path):
    ids, mask = padded_batch()
    ref = make_hf_model("Glm4ForSequenceClassification", num_labels=3, **CONFIGS["mqa_wide_heads"])
    model = glmtorch.AutoModelForSequenceClassification.from_pretrained(save_hf(ref, tmp_path / "seq"))
    assert type(model) is glmtorch.Glm4ForSequenceClassification
    labels = torch.tensor([0, 2, 1])
    ours, theirs = model(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    assert rel_err(ours.logits, theirs.logits) < TOL and abs(float(ours.loss) - float(theirs.loss)) < 1e-5

    ref = make_hf_model("Glm4ForTokenClassification", num_labels=5, **CONFIGS["tied_narrow_heads"])
    model = glmtorch.AutoModelForTokenClassification.from_pretrained(save_hf(ref, tmp_path / "tok"))
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    ours, theirs = model(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert rel_err(ours.logits[real], theirs.logits[real]) < TOL and abs(float(ours.loss) - float(theirs.loss)) < 1e-5

    base = glmtorch.AutoModel.from_pretrained(tmp_path / "tok")
    assert type(base) is glmtorch.Glm4Model


@torch.no_grad()
def test_save_pretrained_reads_back_in_transformers(gqa_glm4, tmp_path):
    import transformers

    ref_model, path = gqa_glm4
    model = glmtorch.Glm4ForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "glm4" and saved["architectures"] == ["Glm4ForCausalLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back).__name__ == "Glm4ForCausalLM"
    ids = torch.randint(1, 160, (1, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(back(ids).logits, ref_model(ids).logits)


def test_glm4_classes_need_a_glm4_config():
    config = glmtorch.GlmConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                head_dim=16, pad_token_id=0)
    with pytest.raises(TypeError, match="Glm4ForCausalLM needs a Glm4Config"):
        glmtorch.Glm4ForCausalLM(config)
    glm4 = glmtorch.Glm4Config(**{k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "head_dim", "pad_token_id")})
    layer = glmtorch.AutoModelForCausalLM.from_config(glm4).model.layers[0]
    assert hasattr(layer, "post_self_attn_layernorm") and hasattr(layer, "post_mlp_layernorm")
    assert not hasattr(glmtorch.GlmForCausalLM(config).model.layers[0], "post_mlp_layernorm")


def test_convert_quantize_and_train_keep_the_family(gqa_glm4, tmp_path):
    """`glmtorch convert` writes a glm4 checkpoint transformers reads; int8 / int4 save and reload as Glm4; a few
    training steps lower the loss and save a glm4 checkpoint."""
    import transformers

    from glmtorch.checkpoint.convert import convert_checkpoint
    from glmtorch.train import TrainConfig, train

    ref_model, path = gqa_glm4
    convert_checkpoint(path, str(tmp_path / "converted"), dtype="bfloat16")
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert saved["model_type"] == "glm4" and saved["architectures"] == ["Glm4ForCausalLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted")).__name__ == \
            "Glm4ForCausalLM"

    ids = torch.randint(1, 160, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exact = ref_model(ids).logits
    for mode, tolerance in (("int8", 2e-2), ("int4", 0.2)):
        quantized = glmtorch.AutoModelForCausalLM.from_pretrained(path, quantize=mode)
        quantized.save_pretrained(tmp_path / mode)
        back = glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / mode)
        assert type(back) is glmtorch.Glm4ForCausalLM
        with torch.no_grad():
            assert torch.equal(back(ids).logits, quantized(ids).logits) and rel_err(back(ids).logits, exact) < tolerance

    from glmtorch.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["To be, or not to be: that is the question."] * 4, 300)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "To be, or not to be: that is the question. " * 3}) + "\n"
                            for _ in range(20)))
    torch.manual_seed(0)
    model = glmtorch.Glm4ForCausalLM.from_config(glmtorch.Glm4Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=tokenizer.pad_token_id))
    state = train(model, tokenizer, TrainConfig(data=str(data), out=str(tmp_path / "trained"), block_size=16,
                                                batch_size=4, lr=3e-3, warmup_steps=1, max_steps=8, eval_every=0,
                                                seed=0, progress=False))
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2])
    assert type(glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / "trained")) is glmtorch.Glm4ForCausalLM


@torch.no_grad()
def test_serving_engine_decodes_glm4_as_generate_does(gqa_glm4):
    """The server's engine (continuous batching, static cache, the fused step) through the offline API."""
    _, path = gqa_glm4
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    from glmtorch.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["To be, or not to be."], 300)
    llm = glmtorch.LLM(model, tokenizer)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    outs = llm.generate(prompts, glmtorch.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])[0, len(prompt):]
        assert out.outputs[0].token_ids == expected.tolist()
