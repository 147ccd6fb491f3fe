"""Parity with transformers' GLM on the same random weights: logits, padding, cached decoding, hidden states,
attention probabilities, the three heads and their losses, bf16."""

import pytest
import torch

import glmtorch
from conftest import CONFIGS, make_hf_model, padded_batch, rel_err, save_hf

TOL = 1e-5


@torch.no_grad()
def test_logits_match_reference(hf_checkpoint):
    ref_model, path = hf_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(1, 160, (2, 11), generator=torch.Generator().manual_seed(0))
    err = rel_err(model(ids).logits, ref_model(ids).logits)
    assert err < TOL, err


@torch.no_grad()
def test_state_dict_speaks_transformers_names(hf_checkpoint):
    """The fused qkv_proj is an implementation detail: state_dict and load_state_dict use q/k/v_proj, both ways."""
    ref_model, path = hf_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ours, theirs = model.state_dict(), ref_model.state_dict()
    assert set(ours) == set(theirs) and not any("qkv_proj" in n for n in ours)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    fresh = glmtorch.GlmForCausalLM.from_config(model.config)
    fresh.load_state_dict(theirs)
    ids = torch.randint(1, 160, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_reference(hf_checkpoint, side):
    ref_model, path = hf_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids, mask = padded_batch(side=side)
    ours = model(ids, attention_mask=mask).logits
    ref = ref_model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(ours[real], ref[real]) < TOL


@torch.no_grad()
def test_left_padded_row_equals_unpadded_row(gqa_checkpoint):
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = model(ids, attention_mask=mask, position_ids=positions).logits
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        alone = model(row).logits[0]
        assert rel_err(batched[i][mask[i].bool()], alone) < TOL


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decode_matches_full_forward(hf_checkpoint, attn):
    ref_model, path = hf_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path, attn_implementation=attn)
    ids, mask = padded_batch(lengths=(10, 7, 4))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    ref_full = ref_model(ids, attention_mask=mask, position_ids=positions).logits
    assert rel_err(full[mask.bool()], ref_full[mask.bool()]) < TOL
    prefill = 5
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill], use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, glmtorch.DynamicCache) and cache.get_seq_length() == prefill
    steps = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                    past_key_values=cache)
        steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert rel_err(stepped[mask.bool()], full[mask.bool()]) < TOL


@torch.no_grad()
def test_cache_position_and_chunked_prefill(gqa_checkpoint):
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(1, 160, (1, 12), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    cache = glmtorch.DynamicCache()
    a = model(ids[:, :7], past_key_values=cache, cache_position=torch.arange(7)).logits
    b = model(ids[:, 7:], past_key_values=cache, cache_position=torch.arange(7, 12)).logits
    assert rel_err(torch.cat([a, b], 1), full) < TOL


@torch.no_grad()
def test_hidden_states_and_attention_probabilities(hf_checkpoint):
    ref_model, path = hf_checkpoint
    ref_model.set_attn_implementation("eager")
    model = glmtorch.GlmForCausalLM.from_pretrained(path)  # sdpa: probabilities come from the eager path
    ids, mask = padded_batch()
    ours = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    ref = ref_model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    real = mask.bool()
    for h, r in zip(ours.hidden_states, ref.hidden_states):
        assert rel_err(h[real], r[real]) < TOL
    assert len(ours.attentions) == model.config.num_hidden_layers
    for a, r in zip(ours.attentions, ref.attentions):
        assert a.shape == r.shape
        rows = real[:, None, :, None].expand_as(a)  # compare the rows of real queries
        assert rel_err(a[rows], r[rows]) < TOL
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)
    base = glmtorch.GlmModel.from_pretrained(path)
    assert rel_err(base(ids, attention_mask=mask).last_hidden_state[real], ref.hidden_states[-1][real]) < TOL


@torch.no_grad()
def test_causal_lm_loss_and_logits_to_keep(gqa_checkpoint):
    ref_model, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(1, 160, (2, 8), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    ours, ref = model(ids, labels=labels), ref_model(ids, labels=labels)
    assert abs(float(ours.loss) - float(ref.loss)) < 1e-6
    loss, logits = ours[:2]  # tuple-style access over the fields that are set
    assert loss is ours.loss and logits is ours.logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 160) and rel_err(last, ours.logits[:, -1:]) < TOL
    picked = model(ids, logits_to_keep=torch.tensor([0, 5])).logits
    assert rel_err(picked, ours.logits[:, [0, 5]]) < TOL
    as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ours.logits)


@torch.no_grad()
@pytest.mark.parametrize("num_labels,labels", [
    (3, torch.tensor([0, 2, 1])),
    (1, torch.tensor([0.5, -1.0, 2.0])),
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
])
def test_sequence_classification_matches_reference(tmp_path, num_labels, labels):
    ref_model = make_hf_model("GlmForSequenceClassification", num_labels=num_labels, **CONFIGS["gqa"])
    path = save_hf(ref_model, tmp_path / "seq")
    model = glmtorch.AutoModelForSequenceClassification.from_pretrained(path)
    ids, mask = padded_batch()
    ours = model(ids, attention_mask=mask, labels=labels)
    ref = ref_model(ids, attention_mask=mask, labels=labels)
    assert ours.logits.shape == (3, num_labels)
    assert rel_err(ours.logits, ref.logits) < TOL
    assert abs(float(ours.loss) - float(ref.loss)) < 1e-5


@torch.no_grad()
def test_token_classification_matches_reference(tmp_path):
    ref_model = make_hf_model("GlmForTokenClassification", num_labels=5, **CONFIGS["mqa_wide_heads"])
    path = save_hf(ref_model, tmp_path / "tok")
    model = glmtorch.AutoModelForTokenClassification.from_pretrained(path)
    ids, mask = padded_batch()
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    ours, ref = model(ids, attention_mask=mask, labels=labels), ref_model(ids, attention_mask=mask, labels=labels)
    assert rel_err(ours.logits[mask.bool()], ref.logits[mask.bool()]) < TOL
    assert abs(float(ours.loss) - float(ref.loss)) < 1e-5


def test_fresh_classification_head_from_lm_checkpoint_warns(gqa_checkpoint):
    _, path = gqa_checkpoint
    with pytest.warns(UserWarning, match="score.weight"):
        model = glmtorch.GlmForSequenceClassification.from_pretrained(path, num_labels=4)
    assert model.score.weight.shape == (4, 64) and model.score.weight.std() > 0


@torch.no_grad()
def test_bf16_within_reference_bf16_error(gqa_checkpoint):
    ref_model, path = gqa_checkpoint
    ids = torch.randint(1, 160, (2, 10), generator=torch.Generator().manual_seed(9))
    exact = ref_model(ids).logits
    import transformers
    ref_bf16 = transformers.GlmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours = glmtorch.GlmForCausalLM.from_pretrained(path, dtype="bf16")
    assert ours.dtype == torch.bfloat16 and ours.model.rotary_emb.inv_freq.dtype == torch.float32
    ref_err = rel_err(ref_bf16(ids).logits.float(), exact)
    our_err = rel_err(ours(ids).logits.float(), exact)
    assert our_err <= 1.5 * ref_err + 1e-4, (our_err, ref_err)
    assert rel_err(ours(ids).logits.float(), ref_bf16(ids).logits.float()) < 2e-2


def test_gradients_flow_and_gradient_checkpointing_is_exact(gqa_checkpoint):
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path).train()
    ids = torch.randint(1, 160, (2, 8), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


@torch.no_grad()
def test_inputs_embeds_equals_input_ids(gqa_checkpoint):
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(1, 160, (1, 6))
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=embeds).logits, model(ids).logits)


def test_bad_inputs_are_clear_errors(gqa_checkpoint):
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="token id 160 is out of range"):
        model(torch.tensor([[1, 160]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="pad_token_id"):
        glmtorch.GlmForCausalLM(glmtorch.GlmConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, head_dim=16))


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_padded_prefill_runs_only_its_real_tokens(tmp_path, name):
    """Prompts of different lengths prefilled in one right-padded pass into a paged pool (fresh, then more tokens
    after each one's cached prefix, as a server's burst): the layers' products see the N real tokens only, not
    B x T rows, and each row's last-token logits equal its prompt's prefilled alone (fp32 < 1e-5)."""
    model = glmtorch.AutoModelForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS[name]), tmp_path))
    g = torch.Generator().manual_seed(3)
    passes = [torch.tensor([9, 3, 14, 1]), torch.tensor([5, 7, 1, 2])]
    rows_seen = []
    hook = model.model.layers[0].mlp.gate_up_proj.register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].numel() // args[0].shape[-1]))
    table = torch.arange(1, 33).view(4, 8)  # 8 blocks of 4 slots a row

    def prefill(rows, pool, starts, lengths, ids):
        positions = torch.arange(ids.shape[1]) if not starts.any() else starts[:, None] + torch.arange(ids.shape[1])
        length = int((starts + ids.shape[1]).max())
        return model.last_token_logits(ids, lengths, None, pool.view(table[rows, :-(-length // 4)], length),
                                       positions)

    batch_pool, alone_pools = model.new_paged_cache(33, 4), [model.new_paged_cache(33, 4) for _ in range(4)]
    starts = torch.zeros(4, dtype=torch.long)
    for lengths in passes:
        ids = torch.zeros(4, int(lengths.max()), dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            ids[i, :n] = torch.randint(1, 160, (n,), generator=g)
        rows_seen.clear()
        batch = prefill(list(range(4)), batch_pool, starts, lengths, ids)
        assert rows_seen == [int(lengths.sum())]
        for i, n in enumerate(lengths.tolist()):
            alone = prefill([i], alone_pools[i], starts[i:i + 1], lengths[i:i + 1], ids[i:i + 1, :n])
            assert rel_err(batch[i], alone[0]) < 1e-5, (i, rel_err(batch[i], alone[0]))
        starts = starts + lengths
    hook.remove()
    for bad in ([3, 0, 2, 1], [3, 5, 2, 1], [3, 2]):  # an empty row, one longer than the batch, a row missing
        with pytest.raises(ValueError, match="lengths must give each of the 4 rows between 1 and 3"):
            model.last_token_logits(torch.ones(4, 3, dtype=torch.long), torch.tensor(bad), None, None, None)
