"""Prompt-lookup speculative decoding (generation/speculate.py): proposals, acceptance and rollback on scripted
proposals, greedy output token-identical with and without it (odd configs, int4, the fused step's multi-row
verify), sampled output with the same distribution (chi-square), batches falling back to plain decoding."""

import pytest
import torch

import glmtorch
from conftest import CONFIGS, make_hf_model, save_hf
from glmtorch.generation import speculate
from glmtorch.generation.speculate import propose


def test_propose_copies_what_followed_the_latest_match():
    seq = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 2, 3]
    assert propose(seq, 2, max_ngram=3) == [4, 7]  # "2 3" last seen before "4 7": the latest occurrence wins
    # past the end of the sequence the copy goes on through itself: "3 -> 4 7 2 3" is a loop of period 4
    assert propose(seq, 10, max_ngram=1) == [4, 7, 2, 3, 4, 7, 2, 3, 4, 7]
    assert propose([1, 2, 3], 4) == [] and propose(seq, 0) == []
    assert propose([5, 5, 5, 5], 3) == [5, 5, 5]  # a model stuck on one token: the loop continued
    assert propose([8, 1, 2, 9, 1, 2], 5) == [9, 1, 2, 9, 1]


def repetitive_prompt(vocab=160, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    chunk = torch.randint(5, vocab, (12,), generator=g)
    return torch.cat([chunk] * (n // 12))[None]


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_output_is_identical(tmp_path, name):
    path = save_hf(make_hf_model(**CONFIGS[name]), tmp_path)
    for quantize in (None, "int4" if CONFIGS[name].get("hidden_size", 64) % 32 == 0 else "int8"):
        model = glmtorch.GlmForCausalLM.from_pretrained(path, **({"quantize": quantize} if quantize else {}))
        ids = repetitive_prompt()
        plain = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[])
        fast = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[], prompt_lookup_num_tokens=5)
        assert torch.equal(plain, fast), (name, quantize)
        assert model._glmtorch_speculation.proposed > 0


@torch.no_grad()
@pytest.mark.parametrize("script", ["all", "none", "partial"])
def test_acceptance_and_rollback_on_scripted_proposals(gqa_checkpoint, monkeypatch, script):
    """Proposals of the model's own greedy continuation (all accepted), of wrong tokens (none), and right then wrong
    (partial): the tokens are the greedy ones each time, and the cache holds what plain decoding writes."""
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(5, 160, (1, 9), generator=torch.Generator().manual_seed(1))
    truth = model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=[])[0, 9:].tolist()
    wrong = [(t + 1) % 160 for t in truth]
    proposals = {"all": truth[1:6], "none": wrong[1:6], "partial": truth[1:3] + wrong[3:6]}[script]
    calls = []

    def scripted(sequence, max_tokens, max_ngram=3):
        calls.append(len(sequence))
        return proposals[:max_tokens] if len(calls) == 1 else []

    monkeypatch.setattr(speculate, "propose", scripted)
    out = model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=[], prompt_lookup_num_tokens=5)
    assert out[0, 9:].tolist() == truth
    decoder = model._glmtorch_speculation
    assert decoder.accepted == {"all": 5, "none": 0, "partial": 2}[script]
    # the cache after the speculative run: the slots of the sequence equal a plain run's
    cache = decoder.cache
    plain = model.new_static_cache(1, 16)
    model(out[:, :15], past_key_values=plain, cache_position=torch.arange(15))
    assert torch.allclose(cache.key_buffer[:, :, :, :15], plain.key_buffer[:, :, :, :15], atol=1e-5)


@torch.no_grad()
def test_sampled_output_has_the_target_distribution(monkeypatch):
    """Speculation changes which random numbers are drawn, never the distribution: the second sampled token's
    frequencies over many seeds agree with its exact probabilities (chi-square, p > 0.001)."""
    torch.manual_seed(0)
    config = glmtorch.GlmConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0)
    model = glmtorch.GlmForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked but not one-hot distributions: proposals are often right, sometimes not
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    # any proposal rule keeps the distribution; this one (the last token plus one) is right often enough to test
    # both acceptance and rejection many times
    monkeypatch.setattr(speculate, "propose", lambda seq, k, max_ngram=3: [(seq[-1] + 1) % 8][:k])
    exact = {}
    with torch.no_grad():
        p1 = torch.softmax(model(ids).logits[0, -1], -1)
        p2 = torch.zeros(8)
        for t1 in range(8):
            p2 += p1[t1] * torch.softmax(model(torch.cat([ids, torch.tensor([[t1]])], 1)).logits[0, -1], -1)
    exact = p2
    n, counts, proposed, accepted = 1500, torch.zeros(8), 0, 0
    for seed in range(n):  # three tokens: the second is decided by accepting or rejecting a proposal
        out = model.generate(ids, max_new_tokens=3, do_sample=True, top_k=0, seed=seed, eos_token_id=[],
                             prompt_lookup_num_tokens=3)
        counts[out[0, ids.shape[1] + 1]] += 1
        proposed += model._glmtorch_speculation.proposed
        accepted += model._glmtorch_speculation.accepted
    expected = exact * n
    keep = expected >= 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 24.3, (chi2, counts, expected)  # df <= 7 at p = 0.001
    assert proposed > n / 2 and 0 < accepted < proposed  # both branches of the rule were taken, many times


@torch.no_grad()
def test_a_batch_decodes_plainly(gqa_checkpoint):
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.cat([repetitive_prompt(seed=1), repetitive_prompt(seed=2)])
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=4),
                       model.generate(ids, max_new_tokens=6, do_sample=False))


@torch.no_grad()
def test_the_serving_engine_speculates_inside_its_batches(gqa_checkpoint):
    """Greedy requests propose their own numbers of tokens, a sampled one just decodes, in one pass: every greedy
    reply equals the engine's without speculation; proposals were checked and some accepted."""
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    from glmtorch.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["To be, or not to be."], 300)
    prompts = [repetitive_prompt(seed=s)[0].tolist() for s in range(3)] + [[5, 6, 7, 8]]
    params = [glmtorch.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 3 + [
        glmtorch.SamplingParams(max_tokens=20, temperature=1.0, seed=4, ignore_eos=True)]

    def run(**kw):
        llm = glmtorch.LLM(model, tokenizer, max_num_seqs=4, prefix_caching=False, **kw)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm.engine

    plain, _ = run()
    fast, engine = run(speculative_tokens=4)
    assert fast == plain  # the sampled row too: its random numbers are drawn as without speculation
    assert engine.speculated > 0 and engine.speculation_accepted > 0


@torch.no_grad()
def test_a_draft_model_proposes(gqa_checkpoint):
    """assistant_model=: the target itself as its draft (every proposal accepted) and its int4 copy; greedy output
    unchanged either way; a draft of another vocabulary is refused."""
    _, path = gqa_checkpoint
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(5, 160, (1, 11), generator=torch.Generator().manual_seed(5))
    plain = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=[])
    for draft, all_accepted in ((model, True), (glmtorch.GlmForCausalLM.from_pretrained(path, quantize="int4"), False)):
        out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=[], assistant_model=draft,
                             num_assistant_tokens=4)
        assert torch.equal(out, plain)
        decoder = model._glmtorch_speculation
        assert decoder.accepted > 0 and (decoder.accepted == decoder.proposed or not all_accepted)
    small = glmtorch.GlmForCausalLM.from_config(model.config.copy(vocab_size=100))
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        model.generate(ids, max_new_tokens=2, assistant_model=small)
