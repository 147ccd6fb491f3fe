"""Automatic prefix caching in the serving engine: full KV blocks are named by a hash chained over their tokens
and prefix (serve.blocks); a prompt reuses the blocks of its longest cached prefix, running or finished requests'
alike, and prefills the rest; the output is the same as with every prompt prefilled whole, also for rows prefilled
together from different starting positions; a partial last block is never shared; the server reports cached
tokens in usage and /metrics."""

import pytest
import torch

import glmtorch

GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(chat_checkpoint):
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(5, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(llm, prompts, **params):
    outs = llm.generate(prompts, glmtorch.SamplingParams(**{**GREEDY, **params}), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]


def test_shared_prefix_is_reused_by_whole_blocks_and_changes_nothing(pair):
    model, tokenizer = pair
    shared = prompt(0, 40)  # two full blocks and 8 tokens: the partial third block is never shared
    first, later = [shared + prompt(1, 5)], [shared + prompt(2, 7), shared + prompt(3, 3), prompt(4, 20)]
    plain = glmtorch.LLM(model, tokenizer, max_num_seqs=4, prefix_caching=False)
    cached = glmtorch.LLM(model, tokenizer, max_num_seqs=4)
    expected = run(plain, first)[0] + run(plain, later)[0]
    got_first, hits_first = run(cached, first)
    got_later, hits_later = run(cached, later)  # one pass, rows starting at 32, 32 and 0
    assert got_first + got_later == expected
    assert hits_first == [0] and hits_later == [32, 32, 0]
    assert cached.engine.prefix_cache_stats() == {"queries": 45 + 47 + 43 + 20, "hits": 64}
    for ids, prompt_ids in zip(expected, first + later):  # and both are generate's
        full = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, eos_token_id=[])
        assert full[0, len(prompt_ids):].tolist() == ids


def test_a_prompt_of_whole_blocks_still_prefills_its_last_token(pair):
    model, tokenizer = pair
    llm = glmtorch.LLM(model, tokenizer, max_num_seqs=2)
    p = prompt(9, 32)
    alone = run(llm, [p])
    again = run(llm, [p])
    assert alone[1] == [0] and again[1] == [16]  # the second block holds the token whose logits start the reply
    assert again[0] == alone[0]


def test_a_conversation_resent_with_its_reply_prefills_only_the_new_turn(pair):
    model, tokenizer = pair
    turn = prompt(5, 30)
    llm = glmtorch.LLM(model, tokenizer, max_num_seqs=2)
    reply, _ = run(llm, [turn], max_tokens=20)
    follow = turn + reply[0] + prompt(6, 6)
    again, hits = run(llm, [follow])
    # blocks filled by decoding are named too: every full block of turn + reply but the last token's (never fed)
    assert hits == [(len(turn) + len(reply[0]) - 1) // 16 * 16] and hits[0] >= 32
    assert again == run(glmtorch.LLM(model, tokenizer, max_num_seqs=2, prefix_caching=False), [follow])[0]


def test_running_requests_share_their_prefix_and_sampling_params_do_not_matter(pair):
    model, tokenizer = pair
    shared = prompt(7, 32)
    prompts = [shared + prompt(8 + i, 4 + i) for i in range(3)]
    expected = run(glmtorch.LLM(model, tokenizer, max_num_seqs=1, prefix_caching=False), prompts)[0]
    from glmtorch.serve.engine import Request

    engine = glmtorch.LLM(model, tokenizer, max_num_seqs=3).engine
    requests = [Request(p, glmtorch.SamplingParams(**GREEDY, seed=i), lambda e: None) for i, p in enumerate(prompts)]
    engine.submit(requests[0])
    engine._prefill(engine._take_waiting())  # the first is running (prefilled, about to decode) ...
    for r in requests[1:]:  # ... when the others arrive: they share its prompt's blocks
        engine.submit(r)
    engine.run(until_idle=True)
    assert [r.cached_tokens for r in requests] == [0, 32, 32]
    texts = [r.history[0, len(r.prompt_ids):len(r.prompt_ids) + r.generated].tolist() for r in requests]
    assert texts == expected
    assert engine.pool.num_free() == engine.pool.usable  # everything released (named blocks stay, evictable)


def test_no_prefix_caching_names_nothing(pair):
    model, tokenizer = pair
    llm = glmtorch.LLM(model, tokenizer, max_num_seqs=2, prefix_caching=False)
    p = prompt(11, 40)
    assert run(llm, [p])[1] == [0] and run(llm, [p])[1] == [0]
    assert not llm.engine.pool.block_named


def test_usage_and_metrics_report_cached_tokens(chat_checkpoint):
    openai = pytest.importorskip("openai")
    import httpx

    from glmtorch.serve.app import create_app
    from glmtorch.serve.server import build_engine
    from test_serve import RunningServer

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_num_seqs=2, max_queue=8)
    server = RunningServer(create_app(engine, tokenizer, "tiny-glm"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence. " * 3}
        first = client.chat.completions.create(model="tiny-glm", messages=[system, {"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second = client.chat.completions.create(model="tiny-glm", max_tokens=4, temperature=0,
                                                messages=[system, {"role": "user", "content": "Hello"}])
        assert second.usage.prompt_tokens_details.cached_tokens >= 16
        assert second.usage.prompt_tokens_details.cached_tokens % 16 == 0
        metrics = httpx.get(server.url + "/metrics").text
        hits = [line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
        assert hits and float(hits[0].split()[-1]) == second.usage.prompt_tokens_details.cached_tokens
    finally:
        server.close()
        engine.stop()
