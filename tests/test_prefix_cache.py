"""Prefix reuse in the serving engine: a prompt starts from the longest prefix a cache row holds (a finished
request's, a running one's), copied into its own row; the output is the same as with every prompt prefilled whole,
also for rows prefilled together from different starting positions; freed rows are overwritten least recently
used first; the server reports cached tokens in usage and /metrics."""

import pytest
import torch

import glmtorch
from glmtorch.serve.engine import MIN_PREFIX

GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(chat_checkpoint):
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(5, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(llm, prompts):
    outs = llm.generate(prompts, glmtorch.SamplingParams(**GREEDY), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]


def test_shared_prefix_is_reused_and_changes_nothing(pair):
    model, tokenizer = pair
    shared = prompt(0, 40)
    first, later = [shared + prompt(1, 5)], [shared + prompt(2, 7), shared + prompt(3, 3), prompt(4, 20)]
    plain = glmtorch.LLM(model, tokenizer, max_batch=4, prefix_caching=False)
    cached = glmtorch.LLM(model, tokenizer, max_batch=4)
    expected = run(plain, first)[0] + run(plain, later)[0]
    got_first, hits_first = run(cached, first)
    got_later, hits_later = run(cached, later)  # one pass, rows starting at 40, 40 and 0
    assert got_first + got_later == expected
    assert hits_first == [0] and hits_later == [40, 40, 0]
    assert cached.engine.prefix_cache_stats() == {"queries": 45 + 47 + 43 + 20, "hits": 80}
    for ids, prompt_ids in zip(expected, first + later):  # and both are generate's
        full = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, eos_token_id=[])
        assert full[0, len(prompt_ids):].tolist() == ids


def test_a_conversation_resent_with_its_reply_prefills_only_the_new_turn(pair):
    model, tokenizer = pair
    turn = prompt(5, 30)
    llm = glmtorch.LLM(model, tokenizer, max_batch=2)
    reply, _ = run(llm, [turn])
    follow = turn + reply[0] + prompt(6, 6)
    again, hits = run(llm, [follow])
    # the reply's keys were written by decode steps, except its last token's (never fed back)
    assert hits == [len(turn) + len(reply[0]) - 1]
    assert again == run(glmtorch.LLM(model, tokenizer, max_batch=2, prefix_caching=False), [follow])[0]


def test_running_request_shares_its_prefix(pair):
    model, tokenizer = pair
    shared = prompt(7, 32)
    prompts = [shared + prompt(8 + i, 4 + i) for i in range(3)]
    llm = glmtorch.LLM(model, tokenizer, max_batch=1)  # one at a time: each finds the one before it
    got, hits = run(llm, prompts)
    assert hits[0] == 0 and all(h >= 32 for h in hits[1:])
    assert got == run(glmtorch.LLM(model, tokenizer, max_batch=1, prefix_caching=False), prompts)[0]
    from glmtorch.serve.engine import Request

    engine = glmtorch.LLM(model, tokenizer, max_batch=3).engine
    requests = []
    for p in prompts:
        events: list = []
        requests.append((Request(p, glmtorch.SamplingParams(**GREEDY), events.append), events))
    engine.submit(requests[0][0])
    engine._prefill(engine._take_waiting())  # the first is running (prefilled, about to decode) ...
    for r, _ in requests[1:]:  # ... when the others arrive: they copy its prompt's prefix from its row
        engine.submit(r)
    engine.run(until_idle=True)
    assert [r.cached_tokens for r, _ in requests] == [0, 32, 32]
    texts = [r.history[0, len(r.prompt_ids):len(r.prompt_ids) + r.generated].tolist() for r, _ in requests]
    assert texts == got


def test_short_prefixes_are_not_copied_and_free_rows_go_least_recently_used(pair):
    model, tokenizer = pair
    llm = glmtorch.LLM(model, tokenizer, max_batch=2)
    a, b, c = prompt(20, 24), prompt(21, 24), prompt(22, 24)
    run(llm, [a])
    run(llm, [b])  # a's row is kept: b goes into the other free row... or a moves there first
    assert run(llm, [a[:MIN_PREFIX - 1] + prompt(23, 10)])[1] == [0]  # a 15-token match is not worth a copy
    run(llm, [c])  # overwrites the least recently used row (a's, or whichever is oldest)
    _, hits = run(llm, [c[:20] + prompt(24, 3)])
    assert hits == [20]


def test_usage_and_metrics_report_cached_tokens(chat_checkpoint):
    openai = pytest.importorskip("openai")
    import httpx

    from glmtorch.serve.app import create_app
    from glmtorch.serve.server import build_engine
    from test_serve import RunningServer

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_batch=2, max_queue=8)
    server = RunningServer(create_app(engine, tokenizer, "tiny-glm"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence. " * 3}
        first = client.chat.completions.create(model="tiny-glm", messages=[system, {"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second = client.chat.completions.create(model="tiny-glm", max_tokens=4, temperature=0,
                                                messages=[system, {"role": "user", "content": "Hello"}])
        assert second.usage.prompt_tokens_details.cached_tokens >= MIN_PREFIX
        metrics = httpx.get(server.url + "/metrics").text
        hits = [line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
        assert hits and float(hits[0].split()[-1]) == second.usage.prompt_tokens_details.cached_tokens
    finally:
        server.close()
        engine.stop()
