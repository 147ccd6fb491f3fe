"""The OpenAI-compatible server, started for real (uvicorn on a loopback port) and driven by the openai client."""

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch

import glmtorch
from glmtorch.serve.app import create_app
from glmtorch.serve.engine import Event
from glmtorch.serve.server import build_engine, warm_up

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(chat_checkpoint):
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_num_seqs=4, max_queue=64)
    server = RunningServer(create_app(engine, tokenizer, "tiny-glm", api_key=None))
    yield server, engine, model, tokenizer
    server.close()
    engine.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny-glm"]
    assert httpx.get(served[0].url + "/health").json()["status"] == "ok"


def test_chat_completion_matches_generate(served, client):
    _, _, model, tokenizer = served
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model="tiny-glm", messages=messages, max_tokens=12, temperature=0)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    stops = sorted(tokenizer.stop_token_ids())
    expected_ids = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stops)[0, ids.shape[1]:]
    expected_ids = [t for t in expected_ids.tolist() if t not in stops]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
    expected = expected[1:] if expected.startswith("\n") else expected
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens >= len(expected_ids)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming_with_usage(client):
    kw = dict(model="tiny-glm", messages=[{"role": "user", "content": "Tell me"}], max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_stop_strings_and_logprobs(client):
    free = client.completions.create(model="tiny-glm", prompt="To be, or not", max_tokens=20, temperature=0)
    text = free.choices[0].text
    assert free.object == "text_completion" and len(text) > 3
    stop = text[2:4]
    stopped = client.completions.create(model="tiny-glm", prompt="To be, or not", max_tokens=20, temperature=0,
                                        stop=[stop], logprobs=2)
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    lp = stopped.choices[0].logprobs
    assert lp.token_logprobs and all(v <= 0 for v in lp.token_logprobs) and len(lp.top_logprobs[0]) == 2


def test_seeds_and_n(client):
    kw = dict(model="tiny-glm", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=1.3, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    many = client.chat.completions.create(**kw, n=3)
    assert len(many.choices) == 3 and many.choices[0].message.content == a
    assert len({c.message.content for c in many.choices}) > 1


def test_logit_bias_and_the_openai_penalties_steer_the_reply(served, client):
    """Two words pushed far above the rest (logit_bias +50 and +49), greedy: alone the first repeats; with
    frequency_penalty 2 each use costs it 2 more, so the two alternate; with presence_penalty 2 the first pays
    once, the second is said once, then the first again for good. The prompt holds the first word already: only
    the reply's tokens count (as vLLM counts them)."""
    tokenizer = served[3]
    a, b = (tokenizer.encode(word, add_special_tokens=False)[-1] for word in (" the", " and"))
    assert a != b and not {a, b} & set(tokenizer.stop_token_ids())

    def reply(**kw):
        out = client.completions.create(model="tiny-glm", prompt="the the the", max_tokens=6, temperature=0,
                                        logprobs=0, logit_bias={str(a): 50, str(b): 49}, **kw)
        return out.choices[0].logprobs.tokens

    one, two = tokenizer.decode([a]), tokenizer.decode([b])
    assert reply() == [one] * 6
    assert reply(frequency_penalty=2.0) == [one, two] * 3
    assert reply(presence_penalty=2.0) == [one, two] + [one] * 4
    banned = client.completions.create(model="tiny-glm", prompt="the the the", max_tokens=6, temperature=0,
                                       logprobs=0, logit_bias={str(b): 49, str(a): -100})
    assert one not in banned.choices[0].logprobs.tokens


def test_min_tokens_holds_the_stop_tokens_back(served, client):
    """The end-of-text token pushed to the top (logit_bias +100): alone the reply ends at once; with min_tokens 3
    it says three tokens first, then ends with it (finish_reason stop, not length)."""
    tokenizer = served[3]
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    kw = dict(model="tiny-glm", prompt="To be", max_tokens=8, temperature=0, logit_bias={str(end): 100})
    at_once = client.completions.create(**kw)
    assert at_once.choices[0].finish_reason == "stop" and at_once.choices[0].text == ""
    held = client.completions.create(**kw, extra_body={"min_tokens": 3}, logprobs=0)
    tokens = held.choices[0].logprobs.tokens  # the reply's tokens, the end-of-text token that ended it last
    assert held.choices[0].finish_reason == "stop" and len(tokens) == 4 and tokens[-1] == "<|endoftext|>"
    assert held.choices[0].text == "".join(tokens[:3])


@pytest.mark.parametrize("field, value, match", [
    ("presence_penalty", 2.5, "presence_penalty=2.5: out of range"), ("frequency_penalty", "a", "must be a number"),
    ("logit_bias", {"abc": 1}, "not a token id"), ("logit_bias", {"99999999": 1}, "not a token id"),
    ("logit_bias", {"3": 500}, r"\[-100, 100\]"), ("logit_bias", [3], "must be an object"),
    ("best_of", 3, "'best_of' is not supported"), ("suffix", "x", "'suffix' is not supported"),
    ("min_tokens", -1, "min_tokens=-1: out of range"), ("min_tokens", 3, "min_tokens=3 is more than max_tokens=2"),
    ("top_logprobs", 21, r"top_logprobs=21: must be an integer in \[0, 20\]"), ("top_logprobs", 2, "needs logprobs"),
])
def test_sampling_fields_are_checked_not_ignored(served, field, value, match):
    """What the server does not do, or a value it cannot use, is a 400 naming the field: never output made as if
    the field had not been sent."""
    for path, body in (("completions", {"prompt": "Hi"}), ("chat/completions", {"messages": [{"role": "user",
                                                                                             "content": "Hi"}]})):
        r = httpx.post(f"{served[0].url}/v1/{path}", json={"model": "tiny-glm", "max_tokens": 2, field: value, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert re.search(match, r.json()["error"]["message"]), r.text
    for no_op in ({"best_of": 1}, {"suffix": ""}, {"min_tokens": 0}, {"logit_bias": {}}, {"presence_penalty": 0}):
        r = httpx.post(f"{served[0].url}/v1/completions", json={"model": "tiny-glm", "max_tokens": 2, "prompt": "Hi",
                                                              **no_op})
        assert r.status_code == 200, r.text


def test_a_stream_that_falls_behind_gets_its_tokens_merged_in_order():
    """Events that piled up while a response was writing come out one per choice: texts and log-probabilities
    joined in order, a final event carrying the text before it; an error is never merged into anything. A reader
    waiting on an empty inbox wakes when events are delivered."""
    from glmtorch.serve.app import Inbox, next_event

    async def drain(items):
        inbox, backlog, out = Inbox(), [], []
        reader = asyncio.ensure_future(next_event(inbox, backlog))
        await asyncio.sleep(0.01)
        assert not reader.done()  # nothing delivered yet
        for item in items:
            inbox.put(item)
        out.append(await asyncio.wait_for(reader, 5))
        while inbox.items or backlog:
            out.append(await next_event(inbox, backlog))
        return out

    lp = [{"token": i} for i in range(4)]
    out = asyncio.run(drain([(0, Event("text", "a", [lp[0]])), (1, Event("text", "b")),
                             (0, Event("text", "c", [lp[1]])), (0, Event("done", "d", [lp[2]], "length", 5, 3)),
                             (1, Event("error", error="boom")), (1, Event("text", "late"))]))
    assert [(i, e.kind, e.text) for i, e in out] == [(0, "done", "acd"), (1, "text", "b"), (1, "error", ""),
                                                     (1, "text", "late")]
    assert out[0][1].token_logprobs == lp[:3] and out[0][1].finish_reason == "length"
    assert (out[0][1].prompt_tokens, out[0][1].completion_tokens) == (5, 3)


def test_burst_of_concurrent_requests_equals_sequential(served):
    url = served[0].url + "/v1/completions"
    engine = served[1]
    prompts = [f"Prompt number {i} says" + " more" * i for i in range(10)]  # lengths differ: padded prefill
    body = lambda p: {"prompt": p, "max_tokens": 12, "temperature": 0}  # noqa: E731
    sequential = [httpx.post(url, json=body(p), timeout=60).json()["choices"][0]["text"] for p in prompts]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            responses = await asyncio.gather(*(c.post(url, json=body(p)) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in responses]

    passes = engine.prefill_passes
    assert asyncio.run(burst()) == sequential
    assert engine.prefill_passes - passes < len(prompts)  # arrivals were prefilled together
    seeded = {"prompt": "Seeded", "max_tokens": 12, "temperature": 1.0, "seed": 3}

    async def seeded_burst():
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*([c.post(url, json=seeded)] + [c.post(url, json=body(p)) for p in prompts]))
        return rs[0].json()["choices"][0]["text"]

    assert asyncio.run(seeded_burst()) == httpx.post(url, json=seeded, timeout=60).json()["choices"][0]["text"]


def test_bench_serve_and_ttft_under_load(served):
    from glmtorch.serve.bench import bench_serve, format_serve_report, ttft_under_load

    report = bench_serve(served[0].url, requests=6, concurrency=3, prompt_words=10, max_tokens=8)
    assert report["completed"] == 6 and report["error_count"] == 0 and report["output_tokens"] == 48
    assert report["ttft_s"]["p50"] > 0 and "tok/s" in format_serve_report(report)
    ttft = ttft_under_load(served[0].url, background=3, long_tokens=60, long_words=20, probes=2, max_pause=0.1)
    assert ttft["ttft_unloaded_s"] > 0 and ttft["ttft_loaded_s"] > 0 and len(ttft["loaded_all_s"]) == 2
    assert "while 3 long requests" in format_serve_report(ttft)
    deadline = time.time() + 30
    while served[1].active and time.time() < deadline:  # the cancelled long requests leave their slots
        time.sleep(0.05)
    assert served[1].active == 0


def test_bench_serve_batching_gain_alternates_the_burst_and_one_at_a_time(served, monkeypatch):
    from glmtorch.serve import bench

    report = bench.batching_gain(served[0].url, rounds=2, burst=3, alone=2, prompt_words=5, max_tokens=6)
    assert report["error_count"] == 0 and len(report["ratios"]) == 2 and report["model"] == "tiny-glm"
    assert report["ratios"] == [b / a for b, a in zip(report["burst_tok_s"], report["alone_tok_s"])]
    assert "batching gain" in bench.format_serve_report(report)

    runs = []  # the order of the runs, each round's pair in turn, and the median of the rounds' ratios
    rates = iter([1.0, 1.0, 10.0, 5.0, 90.0, 10.0, 40.0, 10.0])

    async def run(url, requests, concurrency, prompt_words, max_tokens, *rest):
        runs.append((requests, concurrency, max_tokens))
        return {"model": "m", "output_tok_s": next(rates), "errors": [], "error_count": 0}

    monkeypatch.setattr(bench, "_run", run)
    report = bench.batching_gain("http://x", rounds=3, burst=8, alone=2, max_tokens=16)
    assert runs == [(8, 8, 4), (2, 1, 4)] + [(8, 8, 16), (2, 1, 16)] * 3  # a warm-up of 4 tokens, then in turn
    assert report["ratios"] == [2.0, 9.0, 4.0] and report["batching_gain"] == 4.0
    assert "2.00x / 9.00x / 4.00x: 4.00x on the median" in bench.format_serve_report(report)
    with pytest.raises(ValueError, match="at least 1"):
        bench.batching_gain("http://x", rounds=0)


def test_bench_serve_stream_reader_gives_the_server_text_and_its_errors(served):
    """bench-serve reads streams over plain asyncio HTTP/1.1 (chunked SSE): the text it assembles is the text a
    non-streamed request gets, and a refused request is an error naming the status, not a crash."""
    from glmtorch.serve.bench import _one

    url = served[0].url + "/v1/completions"
    body = {"prompt": "Tell me", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    whole = httpx.post(url, json={**body, "stream": False, "stream_options": None}, timeout=60).json()
    streamed = asyncio.run(_one(None, url, body, {}))
    assert streamed["text"] == whole["choices"][0]["text"] and streamed["tokens"] == whole["usage"]["completion_tokens"]
    assert streamed["prompt_tokens"] == whole["usage"]["prompt_tokens"] and len(streamed["stamps"]) >= 2
    refused = asyncio.run(_one(None, url, {**body, "model": "no-such-model"}, {}))
    assert refused["error"].startswith("HTTP 404") and "no-such-model" in refused["error"]
    closed = asyncio.run(_one(None, "http://127.0.0.1:9/v1/completions", body, {}))
    assert "error" in closed


def test_bench_serve_shared_prefix_and_multi_turn_workloads(served):
    """The shared-preamble workload (first request alone) and multi-turn chats report the server's prefix-cache
    hits, from usage and from /metrics."""
    from glmtorch.serve.bench import bench_serve, format_serve_report, multi_turn

    shared = bench_serve(served[0].url, requests=4, concurrency=2, prompt_words=5, max_tokens=4, shared_words=40)
    assert shared["completed"] == 4 and shared["first_ttft_s"] > 0 and shared["cached_prompt_tokens"] >= 3 * 16
    assert 0 < shared["prefix_cache_hit_rate"] < 1 and "behind the shared preamble" in format_serve_report(shared)
    chats = multi_turn(served[0].url, users=2, concurrency=2, turns=3, prompt_words=6, max_tokens=6)
    assert chats["completed"] == 6 and chats["error_count"] == 0 and chats["cached_prompt_tokens"] > 0
    assert chats["prefix_cache_hit_rate"] > 0 and "multi-turn chats of 3 turns" in format_serve_report(chats)


def test_long_prompt_under_load_reports_the_streams_gaps(served):
    from glmtorch.serve.bench import format_serve_report, long_prompt_under_load

    report = long_prompt_under_load(served[0].url, background=3, long_words=50, prompt_words=5, max_tokens=200,
                                    calm=0.03)  # the tiny model's streams last ~0.3 s
    assert report["long_prompt_tokens"] > 50 and report["usual_gap_s"] > 0 and report["gaps_during_prefill"] >= 1
    assert report["worst_gap_during_prefill_s"] >= report["usual_gap_s"] * 0.5
    assert "streams decode" in format_serve_report(report)
    with pytest.raises(RuntimeError, match="more --max-tokens"):
        long_prompt_under_load(served[0].url, background=2, long_words=20, prompt_words=5, max_tokens=2, calm=0.5)


def test_ttft_under_load_rejects_a_negative_probe_pause():
    from glmtorch.serve.bench import ttft_under_load

    with pytest.raises(ValueError, match="probe pause must be 0 seconds or more"):
        ttft_under_load("http://127.0.0.1:9", max_pause=-1)


def test_client_disconnect_frees_the_slot(served):
    server, engine, _, _ = served
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "A long story", "max_tokens": 200, "temperature": 1.0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, param):
    url = served[0].url + "/v1/chat/completions"
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url, content=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    ok = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def _eventually(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_a_request_counts_as_arriving_until_it_is_submitted_or_refused(served):
    """A generation request counts in engine.arriving from its headers (its body still trickling in) until it
    is submitted (a lone one no longer counts when the engine gets it, so an idle engine does not wait on it); one
    answered with an error without being submitted stops counting too, and nothing else counts."""
    server, engine = served[0], served[1]
    seen_at_submit = []
    submit = engine.submit

    def submit_noting_arrivals(request):
        seen_at_submit.append(engine.arriving)
        submit(request)

    engine.submit = submit_noting_arrivals  # a lone request is no longer arriving when the engine gets it
    try:
        httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 2}, timeout=30)
    finally:
        del engine.submit
    assert seen_at_submit == [0, 0]
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        assert _eventually(lambda: engine.arriving == 1)
        s.sendall(body[5:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and engine.arriving == 0
    url = server.url + "/v1/completions"
    with httpx.stream("POST", url, json={"prompt": "Hi", "max_tokens": 64, "ignore_eos": True, "stream": True},
                      timeout=30) as streamed:
        next(streamed.iter_lines())
        assert engine.arriving == 0  # submitted: no longer arriving while it decodes
    for bad, status in (("not json", 400), ('{"prompt": "x", "max_tokens": -1}', 400),
                        ('{"prompt": "x", "model": "gpt-9"}', 404)):
        r = httpx.post(url, content=bad, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status and _eventually(lambda: engine.arriving == 0)
    assert httpx.get(server.url + "/health").status_code == 200 and engine.arriving == 0


def test_context_limit_is_named(served):
    r = httpx.post(served[0].url + "/v1/completions", json={"prompt": "word " * 300, "max_tokens": 8}, timeout=30)
    assert r.status_code == 400 and "context is 256 tokens" in r.json()["error"]["message"]


def test_queue_full_is_503(chat_checkpoint):
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_num_seqs=1, max_queue=0)
    # The busy request must still hold the one slot when the second arrives, however fast this machine decodes:
    # its decode steps wait until the test has seen the 503. (Its first token may decode to no text, so the test
    # watches the engine's slot, not the stream.)
    released = threading.Event()
    decode_step = engine._decode_step
    engine._decode_step = lambda: (released.wait(60), decode_step())
    server = RunningServer(create_app(engine, tokenizer, "tiny-glm"))
    busy_reply = {}

    def busy_request():
        busy_reply["body"] = httpx.post(server.url + "/v1/completions", timeout=120,
                                        json={"prompt": "Busy", "max_tokens": 8, "ignore_eos": True}).json()

    busy = threading.Thread(target=busy_request)
    try:
        busy.start()
        deadline = time.monotonic() + 60
        while engine.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 1
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "Me too", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        released.set()
        busy.join(timeout=120)
        assert busy_reply["body"]["choices"][0]["finish_reason"] == "length"
    finally:
        released.set()
        busy.join(timeout=120)
        server.close()
        engine.stop()


def test_api_key(chat_checkpoint):
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_num_seqs=1, max_queue=4)
    server = RunningServer(create_app(engine, tokenizer, "tiny-glm", api_key="sesame"))
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == "tiny-glm"
        for path in ("/tokenize", "/detokenize", "/TOKENIZE"):  # the key guards them too (paths are exact)
            assert httpx.post(server.url + path, json={"prompt": "x"}).status_code in (401, 404)
        assert httpx.post(server.url + "/tokenize", json={"prompt": "x"},
                          headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200  # open to scrapers, as vLLM's
    finally:
        server.close()
        engine.stop()


class ScriptedEngine:
    """Stands in for the engine: every request gets `reply` as its text (GLM-4's raw output)."""

    def __init__(self, reply: str, context: int = 4096, finish: str = "stop"):
        self.reply, self.context, self.active, self.waiting, self.requests = reply, context, 0, [], []
        self.finish = finish

    def submit(self, request):
        self.requests.append(request)
        for piece in (self.reply[i:i + 3] for i in range(0, len(self.reply), 3)):
            request.emit(Event("text", text=piece))
        request.emit(Event("done", finish_reason=self.finish, prompt_tokens=len(request.prompt_ids),
                           completion_tokens=5))


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(tokenizer_dir, stream):
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(tokenizer_dir)
    engine = ScriptedEngine('get_weather\n{"city": "Paris"}')
    server = RunningServer(create_app(engine, tokenizer, "scripted"))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        if stream:
            chunks = list(c.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], stream=True))
            deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
            calls = [tc for d in deltas for tc in (d.tool_calls or [])]
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            call = calls[0]
        else:
            reply = c.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
            call, finish = reply.choices[0].message.tool_calls[0], reply.choices[0].finish_reason
        assert finish == "tool_calls" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        # the tool's answer goes back as a `tool` message and renders as an observation turn
        follow = messages + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
        engine.reply = "\nIt is 21 degrees."
        answer = c.chat.completions.create(model="scripted", messages=follow, tools=[WEATHER])
        assert answer.choices[0].message.content == "It is 21 degrees." and answer.choices[0].finish_reason == "stop"
        rendered = tokenizer.decode(engine.requests[-1].prompt_ids)
        assert rendered.endswith('<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temp": 21}<|assistant|>')
    finally:
        server.close()


@pytest.mark.parametrize("reply", ['launch_rockets\n{"n": 3}', 'get_weather\n{"city": Paris}'])
def test_lookalike_tool_calls_stay_content(tokenizer_dir, reply):
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(tokenizer_dir)
    server = RunningServer(create_app(ScriptedEngine(reply), tokenizer, "scripted"))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        out = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}], tools=[WEATHER])
        assert out.choices[0].message.tool_calls is None and out.choices[0].message.content == reply
        assert out.choices[0].finish_reason == "stop"
    finally:
        server.close()


@pytest.mark.slow
@torch.no_grad()
def test_compiled_engine_steps_any_row_count_with_one_graph(chat_checkpoint, monkeypatch):
    """The compiled decode step takes exactly the active rows (a dynamic batch dimension): every count from 2 up
    shares one graph, and each request's greedy text equals generate's for it alone."""
    from torch._dynamo.utils import counters

    from glmtorch.serve.engine import Request, SamplingParams

    _, path = chat_checkpoint
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    prompts = [list(range(3, 3 + n)) for n in (4, 9, 6, 12, 7)]
    monkeypatch.setenv("GLMTORCH_COMPILE", "0")
    eager = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    expected = [eager.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=[])[0, len(p):].tolist()
                for p in prompts]
    monkeypatch.setenv("GLMTORCH_COMPILE", "1")
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_num_seqs=8, max_queue=8)

    def burst(batch):
        done = [threading.Event() for _ in batch]
        requests = [Request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                            lambda e, d=d: e.kind != "text" and d.set()) for p, d in zip(batch, done)]
        for r in requests:
            engine.submit(r)
        assert all(d.wait(300) for d in done)
        return [r.history[0, len(r.prompt_ids):].tolist() for r in requests]

    try:
        warm_up(engine)  # compiles the one-row step and the step for 2+ rows
        graphs = counters["stats"]["unique_graphs"]
        assert burst(prompts) == expected  # requests join as they are submitted: many row counts
        assert burst(prompts[:3]) == expected[:3]
        assert counters["stats"]["unique_graphs"] == graphs  # and none of them compiled a new graph
    finally:
        engine.stop()


def test_warm_up_makes_the_prefill_attention_choices(chat_checkpoint, timed_prefill_attention):
    """warm_up measures how prefill passes attend for every pair of buckets (new tokens, slots) the engine's passes
    can meet, with the model's head shape, so that no served pass stops to time one (a later pass measures
    nothing), and which batches the fused decode step runs, for every row bucket up to max_num_seqs (within a time
    budget)."""
    from glmtorch import cache
    from glmtorch.fastpath import FusedDecodeStep

    calls, _ = timed_prefill_attention
    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    engine = build_engine(model, glmtorch.AutoTokenizer.from_pretrained(path), max_num_seqs=4, max_queue=4,
                          max_context=200)
    try:
        warm_up(engine)
        assert isinstance(engine.step_fn, FusedDecodeStep)
        assert {2, 4} <= set(engine.step_fn.kernels_win) and 8 not in engine.step_fn.kernels_win
        engine.step_fn.kernels_win.clear()  # past its time budget, no bucket is begun
        engine.step_fn.decide_batches(model, 8, seconds=0)
        assert not engine.step_fn.kernels_win
        engine.step_fn.decide_batches(model, 8)
        assert set(engine.step_fn.kernels_win) == {2, 4, 8}
        c = model.config
        shape = (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        assert sorted(calls) == sorted(shape + (new, slots) for new in (32, 64, 128, 256)
                                       for slots in (32, 64, 128, 256) if new <= slots)
        count = len(calls)
        assert cache.prefill_reads_in_place(torch.float32, *shape, 190, 100)  # (128, 256): decided at warm-up
        assert len(calls) == count
    finally:
        engine.stop()


def test_engine_runs_in_the_callers_thread(chat_checkpoint):
    """Engine(thread=False): `glmtorch serve` runs the loop in the main thread (OpenMP is several times quicker to
    start a parallel region there); run(until_idle=True) serves what is queued and returns, stop() ends the rest."""
    import threading

    from glmtorch.serve.engine import Engine, Request, SamplingParams

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = Engine(model, tokenizer, max_num_seqs=2, thread=False)
    assert engine.thread is None
    events, threads = [], set()

    def emit(event):
        events.append(event)
        threads.add(threading.current_thread())

    for _ in range(3):
        engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), emit))
    engine.run(until_idle=True)
    assert torch.is_grad_enabled()  # the caller's grad mode is left as it was
    assert [e.completion_tokens for e in events if e.kind == "done"] == [4, 4, 4]
    assert threads == {threading.current_thread()}
    engine.submit(Request([5, 6], SamplingParams(max_tokens=4), emit))
    engine.stop()
    assert events[-1].kind == "error" and "shutting down" in events[-1].error


def test_prefill_pass_is_bounded_in_time_while_others_decode(chat_checkpoint):
    """A prefill pass is every decoding stream's wait for its next token: while any decode, a pass takes only as
    many prompt tokens as the measured prefill rate allows in prefill_seconds; with none decoding, a full pass."""
    from glmtorch.serve.engine import Engine, Request, SamplingParams

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = Engine(model, tokenizer, max_num_seqs=8, thread=False, prefill_tokens=1000, prefill_seconds=0.5)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def submit(count):
        for _ in range(count):
            engine.submit(Request(list(range(5, 25)), params, lambda e: None))

    submit(4)
    engine.prefill_rate = 80.0  # tokens/s: 40 tokens (two 20-token prompts) fit in half a second
    assert len(engine._take_waiting()) == 4  # nobody decoding: no bound
    submit(4)
    assert len(engine._take_waiting()) == 2  # four decoding: two prompts per pass
    engine.stop()


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(chat_checkpoint):
    """A prompt longer than one pass goes in chunks while another stream decodes: that stream keeps getting
    tokens between the chunks, and both replies equal the same requests served alone (whole-prompt prefill)."""
    from glmtorch.serve.engine import Engine, Request, SamplingParams

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    short, long = [5, 6, 7], [(7 * i) % 150 + 3 for i in range(90)]

    def reply_alone(ids):
        engine, pieces = Engine(model, tokenizer, max_num_seqs=2, thread=False), []
        engine.submit(Request(ids, params, lambda e: pieces.append(e.text)))
        engine.run(until_idle=True)
        return "".join(pieces)

    engine = Engine(model, tokenizer, max_num_seqs=2, thread=False, prefill_tokens=32)
    engine.prefill_rate = 64.0  # tokens/s "measured": 32-token passes while a stream decodes
    replies: dict[int, list[str]] = {0: [], 1: []}
    passes_seen_by_short: list[int] = []
    engine.submit(Request(short, params, lambda e: (replies[0].append(e.text),
                                                    passes_seen_by_short.append(engine.prefill_passes))))
    engine.submit(Request(long, params, lambda e: replies[1].append(e.text)))
    engine.run(until_idle=True)
    assert engine.prefill_passes == 4  # the short prompt, then the long one in chunks of 32, 32 and 26 tokens
    assert len(set(passes_seen_by_short)) >= 3  # the short stream's tokens kept coming between the chunks
    assert "".join(replies[0]) == reply_alone(short) and "".join(replies[1]) == reply_alone(long)


def test_metrics_count_what_was_served(served, client):
    """GET /metrics parses as Prometheus text with vLLM's names; a finished request moves the token counters, the
    success counter and the latency histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        r = httpx.get(served[0].url + "/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    before = scrape()
    client.completions.create(model="tiny-glm", prompt="Hello there", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = scrape()
    name = "[('model_name', 'tiny-glm')]"
    assert after["vllm:generation_tokens_total" + name] - before.get("vllm:generation_tokens_total" + name, 0) == 5
    assert after["vllm:prompt_tokens_total" + name] > before.get("vllm:prompt_tokens_total" + name, 0)
    done = "vllm:request_success_total[('finished_reason', 'length'), ('model_name', 'tiny-glm')]"
    assert after[done] - before.get(done, 0) == 1
    assert after["vllm:time_to_first_token_seconds_count" + name] >= 1
    assert after["vllm:inter_token_latency_seconds_count" + name] >= 4
    assert after["vllm:num_requests_running" + name] == 0 and after["vllm:kv_cache_usage_perc" + name] == 0
    assert after["vllm:num_preemptions_total" + name] == served[1].preemptions == 0


def test_tokenize_and_detokenize(served):
    """vLLM's /tokenize (a prompt, or chat messages through the template) and /detokenize, checked like the rest."""
    _, _, _, tokenizer = served
    url = served[0].url
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello there"}, timeout=30).json()
    assert r["tokens"] == tokenizer.encode("Hello there") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=30).json()
    assert chat["tokens"] == tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                           add_generation_prompt=True)
    back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back["prompt"] == tokenizer.decode(r["tokens"])
    for body in ({"tokens": [True]}, {"tokens": [-1]}, {"tokens": [10 ** 9]}, {"tokens": "12"}, {}):
        bad = httpx.post(url + "/detokenize", json=body, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(url + "/tokenize", json={"prompt": 5}, timeout=30).status_code == 400
    assert httpx.post(url + "/tokenize", json={"prompt": "x", "model": "other"}, timeout=30).status_code == 404


def test_the_kv_pool_follows_its_memory_budget(chat_checkpoint):
    """As many blocks as --kv-cache-memory holds, never more than max_num_seqs full contexts need; a pool smaller
    than one context shortens the context (a request alone must always fit); too little for two blocks is refused."""
    from glmtorch.serve.engine import Engine, default_kv_cache_memory

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    per_block = model.kv_block_bytes(16)
    cache = model.new_paged_cache(3, 16)
    assert 3 * per_block == sum(t.numel() * t.element_size() for t in (cache.key_buffer, cache.value_buffer))
    engine = Engine(model, tokenizer, max_num_seqs=4, thread=False, kv_cache_memory=40 * per_block + 1)
    assert engine.pool.usable == 40 and engine.context == 256
    engine = Engine(model, tokenizer, max_num_seqs=4, thread=False, kv_cache_memory=10**6 * per_block)
    assert engine.pool.usable == 4 * 17  # 4 contexts of 256 tokens (and the token after them)
    with pytest.warns(UserWarning, match="limited to 160 tokens"):
        engine = Engine(model, tokenizer, max_num_seqs=4, thread=False, kv_cache_memory=10 * per_block)
    assert engine.context == 160
    with pytest.raises(ValueError, match="kv-cache-memory"):
        Engine(model, tokenizer, thread=False, kv_cache_memory=per_block)
    assert default_kv_cache_memory(model) > 0


def test_latency_histogram_matches_prometheus_client():
    """The engine-fed histogram renders the same buckets, count and sum as prometheus_client's own Histogram
    given the same values, boundaries included (a bucket counts values <= its bound)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from glmtorch.serve.metrics import ITL_BUCKETS, LatencyHistogram

    values = [0.0, 0.005, 0.0050001, 0.01, 0.3, 4.99, 5.0, 5.01, 1e6, 0.074999]
    ours = LatencyHistogram("vllm:inter_token_latency_seconds", "d", ITL_BUCKETS)
    registry = CollectorRegistry()
    reference = Histogram("vllm:inter_token_latency_seconds", "d", ["model_name"], buckets=ITL_BUCKETS,
                          registry=registry).labels("m")
    for v in values:
        ours.observe(v)
        reference.observe(v)

    class One:
        def collect(self):
            yield ours.family("m")

    mine = CollectorRegistry()
    mine.register(One())

    def samples(r):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(generate_latest(r).decode()) for s in f.samples
                if not s.name.endswith("_created")}

    assert samples(mine) == samples(registry)


@pytest.mark.parametrize("text", ["", " word", 'quote " and \\ backslash', "\n\t\x00\x1f", "你好🙂", "\u2028\ud7ff"])
def test_chunk_format_pieces_are_the_bytes_json_dumps_gives(text):
    """The pre-rendered per-token chunk equals sse() of the whole chunk, for completions and chat deltas."""
    from glmtorch.serve.app import ChunkFormat, sse

    head = {"id": "cmpl-x\"y", "created": 1790000000, "model": "名前"}
    completions, chat = ChunkFormat(head, "text_completion"), ChunkFormat(head, "chat.completion.chunk")
    for index in (0, 7, 123):
        assert completions.piece(index, text) == sse({**head, "object": "text_completion", "choices": [
            {"index": index, "text": text, "finish_reason": None, "logprobs": None}]})
        assert chat.piece(index, text) == sse(
            {**head, "object": "chat.completion.chunk",
             "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None, "logprobs": None}]})


@pytest.mark.parametrize("cut", [1, 3, 7, 64])
def test_bench_client_reads_chunked_events_split_anywhere(cut):
    """bench-serve's client parses the chunked framing and the event lines whatever sizes the socket reads
    come in: a response written a few bytes at a time (through a size line, a chunk, a CRLF) gives every
    payload once, in order, and nothing after the last chunk."""
    from glmtorch.serve.bench import _sse_data

    events = [json.dumps({"n": i, "text": "é\n" * i}) for i in range(5)] + ["[DONE]"]
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    framed, at = b"", 0
    for size in (5, 40, 1, 300, len(body)):  # chunks that end mid-line
        part, at = body[at:at + size], at + size
        if part:
            framed += b"%x\r\n" % len(part) + part + b"\r\n"
    framed += b"0\r\n\r\ndata: after the end\n\n"
    response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + framed

    async def main():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            for i in range(0, len(response), cut):
                writer.write(response[i:i + cut])
                await writer.drain()
                await asyncio.sleep(0)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return [d async for events in _sse_data(f"http://127.0.0.1:{port}/v1/completions", {}, {}) for d in events]

    assert asyncio.run(main()) == events


@pytest.mark.parametrize("stall_after", ["nothing", "headers", "one event"])
def test_bench_client_gives_up_on_a_stalled_stream(stall_after):
    """A server that stops sending (before its status line, after its headers, or mid-body) ends the request
    with a TimeoutError after `timeout` seconds without data, whatever came before; a slow but steady one is not
    cut off even when the whole response takes longer than that."""
    from glmtorch.serve.bench import _sse_data

    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b"data: {}\n\n"
    before = {"nothing": b"", "headers": head, "one event": head + b"%x\r\n%s\r\n" % (len(event), event)}

    async def collect(handle, timeout):
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return [d async for events in _sse_data(f"http://127.0.0.1:{port}/v1/completions", {}, {}, timeout)
                    for d in events]

    async def stalls(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(before[stall_after])
        await asyncio.sleep(5)

    async def steady(reader, writer):  # an event every 0.1 s for 0.6 s, against a 0.3 s timeout
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        for _ in range(6):
            await asyncio.sleep(0.1)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        writer.write(b"0\r\n\r\n")
        writer.close()

    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        asyncio.run(collect(stalls, 0.3))
    assert time.perf_counter() - start < 3
    assert asyncio.run(collect(steady, 0.3)) == ["{}"] * 6


def test_the_http_thread_runs_at_a_lower_priority_than_the_engine():
    """serve() lowers the HTTP thread's priority (Linux, per thread): the calling thread's nice value goes up by
    HTTP_NICE, another thread's (the engine's) stays as it was."""
    import os
    import sys

    from glmtorch.serve.server import HTTP_NICE, lower_this_threads_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux notion")
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def thread():
        tid = threading.get_native_id()
        lower_this_threads_priority()
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    assert seen["after"] == min(19, before + HTTP_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_serve_freezes_what_startup_made_before_it_listens(monkeypatch):
    """serve() moves the objects made while loading and warming up out of the garbage collector's reach before
    HTTP starts: a full collection walked ~330,000 of them, 130-170 ms with the GIL held, every ~530 requests."""
    import gc
    import signal

    import uvicorn

    from glmtorch.serve import server

    seen = {}

    def run(self):  # stands in for uvicorn: what is frozen when the server would start listening
        seen["frozen"] = gc.get_freeze_count()
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(server, "check_address", lambda host, port: None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    gc.unfreeze()
    try:
        server.serve(None, port=0, max_num_seqs=2, kv_cache_memory=1 << 22)
    finally:
        gc.unfreeze()  # the test process collects as before, and Ctrl-C stops pytest again
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen["frozen"] > 10_000
