"""glmtorch.LLM: batched generation over the serving engine, in vLLM's shape."""

import pytest
import torch

import glmtorch
from glmtorch import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    _, path = chat_checkpoint
    return LLM(path, max_num_seqs=4, max_context=128)


def test_generate_matches_generate_and_keeps_order(llm, chat_checkpoint):
    """More prompts than slots, each with its own parameters: outputs come back in order, greedy ones equal
    model.generate's tokens, and a seeded sampled one equals itself run alone."""
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    prompts = ["Hello there", "Good morrow", "What say you", "Speak", "Once more", "Hail"]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
    outs = llm.generate(prompts, [greedy] * 5 + [sampled])
    assert [o.prompt for o in outs] == prompts
    for out in outs[:5]:
        ids = torch.tensor([tokenizer.encode(out.prompt)])
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[])[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == expected and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == tokenizer.decode(expected)
    assert llm.generate("Hail", sampled)[0].outputs[0].token_ids == outs[5].outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": "Hi"}], greedy)
    assert len(chat) == 1 and len(chat[0].outputs[0].token_ids) == 6
    ids = llm.generate([[5, 6, 7]], greedy)[0]
    assert ids.prompt is None and ids.prompt_token_ids == [5, 6, 7]


@pytest.mark.parametrize("prompts,params,match", [
    ([], None, "non-empty"),
    (["x"], SamplingParams(temperature=-1), "temperature"),
    (["x"], SamplingParams(max_tokens=0), "max_tokens"),
    (["x"], SamplingParams(max_tokens=500), "context"),
    (["x"], [SamplingParams(), SamplingParams()], "one per prompt"),
    (["x"], SamplingParams(frequency_penalty=3), "frequency_penalty=3"),
    (["x"], SamplingParams(logit_bias={10**9: 1.0}), "logit_bias: 1000000000 is not a token id"),
    # the rules beyond one value's range: SamplingParams.checked, the same for the server
    (["x"], SamplingParams(max_tokens=4, min_tokens=5), "min_tokens=5 is more than max_tokens=4"),
    (["x"], SamplingParams(logprobs=True, top_logprobs=-1), r"top_logprobs=-1: must be an integer in \[0, 20\]"),
    (["x"], SamplingParams(logprobs=True, top_logprobs=21), r"top_logprobs=21"),
    (["x"], SamplingParams(top_logprobs=2), "top_logprobs=2 needs logprobs set true"),
    (["x"], SamplingParams(ignore_eos="no"), "ignore_eos='no': must be true or false"),
    (["x"], SamplingParams(logprobs=1), "logprobs=1: must be true or false"),
    (["x"], SamplingParams(temperature=None), "temperature=None: must be a number"),
    (["x"], SamplingParams(stop=["ok", ""]), "stop must be a non-empty string or a list of them"),
    (["x"], SamplingParams(stop=7), "stop must be"),
    (["x"], SamplingParams(constraint="json"), "constraint must be a compiled"),
    (["x", "y"], [SamplingParams(), SamplingParams(top_p=0)], "top_p=0"),  # the second: neither runs
    (["x"], SamplingParams(n=0), "n=0: must be an integer >= 1"),
    (["x"], SamplingParams(n=2, seed=2**63 - 1), "no room for n=2"),
    ([[10**9]], None, "token ids"),
    ([3.5], None, "string or a list"),
])
def test_bad_input_is_refused_before_anything_runs(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params)
    assert llm.engine.active == 0 and not llm.engine.waiting


def test_the_engine_checks_every_request_it_is_given(llm):
    """Engine.submit applies the same rules to a request built by hand (not through LLM or the server): refused
    before it is queued; a lone stop string is taken as a list of one, as vLLM takes it."""
    from glmtorch.generation.config import SamplingValueError
    from glmtorch.serve.engine import Request

    with pytest.raises(SamplingValueError, match="min_tokens=3 is more than max_tokens=2") as e:
        llm.engine.submit(Request([5, 6], SamplingParams(max_tokens=2, min_tokens=3), lambda event: None))
    assert e.value.field == "min_tokens" and not llm.engine.waiting
    out = llm.generate("x", SamplingParams(max_tokens=3, temperature=0, stop="\n"))[0].outputs[0]
    assert len(out.token_ids) <= 3 and "\n" not in out.text


def test_n_completions_each_seeded_and_their_logprobs(llm):
    """SamplingParams(n=3): three completions of each prompt, index 0-2, completion k the same as the prompt run
    alone with seed + k; logprobs=True gives each a log-probability per generated token (its token's own, the
    largest of its top_logprobs), none where not asked for. A seed at the top of its range still has room for n
    completions counted from it."""
    params = SamplingParams(max_tokens=5, temperature=0.9, seed=11, ignore_eos=True, n=3, logprobs=True,
                            top_logprobs=2)
    outs = llm.generate(["Hail", "Good morrow"], params)
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2]
        for c in out.outputs:
            alone = llm.generate(out.prompt, SamplingParams(max_tokens=5, temperature=0.9, seed=11 + c.index,
                                                           ignore_eos=True))[0].outputs[0]
            assert c.token_ids == alone.token_ids and c.text == alone.text and alone.logprobs is None
            assert len(c.logprobs) == len(c.token_ids) == 5
            for entry in c.logprobs:
                assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
                assert entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # three seeds, not one sample thrice
    top = llm.generate("Hail", SamplingParams(max_tokens=2, seed=2**63 - 3, n=3))[0].outputs
    assert [c.index for c in top] == [0, 1, 2]
