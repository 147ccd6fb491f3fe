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
    ([[10**9]], None, "token ids"),
    ([3.5], None, "string or a list"),
])
def test_bad_input_is_refused_before_anything_runs(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params)
    assert llm.engine.active == 0 and not llm.engine.waiting
