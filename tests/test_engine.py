"""The serving engine on its paged KV cache (serve/engine.py): admission by free blocks, preemption when the pool
runs out (the youngest request gives its blocks up and resumes later with the same output), more requests than
the pool holds at once, and 256 concurrent requests with default settings, each equal to itself alone."""

import pytest
import torch

import glmtorch
from glmtorch.serve.engine import Event, Request, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore:the KV cache holds")  # the small pools here shorten the context


@pytest.fixture(scope="module")
def pair(chat_checkpoint):
    _, path = chat_checkpoint
    return glmtorch.AutoModelForCausalLM.from_pretrained(path), glmtorch.AutoTokenizer.from_pretrained(path)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 150, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def outputs(llm, batch, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]


def alone(model, tokenizer, batch, params) -> list[list[int]]:
    llm = glmtorch.LLM(model, tokenizer, max_num_seqs=1, prefix_caching=False)
    return [outputs(llm, [p], params)[0] for p in batch]


@pytest.mark.parametrize("sampled", [False, True])
def test_a_full_pool_preempts_the_youngest_and_it_resumes_with_the_same_output(pair, sampled):
    model, tokenizer = pair
    per_block = model.kv_block_bytes(16)
    batch = [p + [7] * 20 for p in prompts(4, seed=1)]  # 23-59 prompt tokens, 60 more each: 6-8 blocks apiece
    params = [SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.9 if sampled else 0, seed=i)
              for i in range(4)]
    expected = [alone(model, tokenizer, [p], q)[0] for p, q in zip(batch, params)]
    # 14 blocks: all four prompts fit (12 blocks), their outputs do not
    llm = glmtorch.LLM(model, tokenizer, max_num_seqs=4, kv_cache_memory=14 * per_block, prefix_caching=False)
    assert outputs(llm, batch, params) == expected
    assert llm.engine.preemptions > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.usable  # every block back


def test_more_requests_than_the_pool_holds_all_complete(pair):
    model, tokenizer = pair
    per_block = model.kv_block_bytes(16)
    batch = prompts(24, seed=2)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = glmtorch.LLM(model, tokenizer, kv_cache_memory=20 * per_block)  # ~6 requests' worth of blocks
    got = outputs(llm, batch, params)
    assert got == alone(model, tokenizer, batch, params)
    assert all(len(ids) == 24 for ids in got)


def test_256_concurrent_requests_with_default_settings_each_equal_alone(pair):
    model, tokenizer = pair
    batch = prompts(256, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = glmtorch.LLM(model, tokenizer)
    assert llm.engine.max_num_seqs == 256
    seen = []
    step = llm.engine._decode_step
    llm.engine._decode_step = lambda: (seen.append(llm.engine.active), step())[1]
    assert outputs(llm, batch, params) == alone(model, tokenizer, batch, params)
    assert max(seen) == 256  # all of them decoded together


def test_weights_in_blocks_change_no_output(pair, monkeypatch):
    """The kernels' blocks of 16 rows (pack_weights' third layout) under the engine: its padded prefill passes and
    batched decode steps on them give each request the tokens it gets on plain weights."""
    from glmtorch import kernels
    from glmtorch.fastpath import pack_weights, unpack_weights

    model, tokenizer = pair
    if not kernels.takes_blocks(torch.float32, 16, 16):
        pytest.skip("the kernels here take no fp32 blocks (AVX-512)")
    batch = prompts(12, seed=5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = outputs(glmtorch.LLM(model, tokenizer, prefix_caching=False), batch, params)
    monkeypatch.setenv("GLMTORCH_PACK", "blocks")
    try:
        assert pack_weights(model, rows=16) > 0
        assert outputs(glmtorch.LLM(model, tokenizer, prefix_caching=False), batch, params) == expected
    finally:
        unpack_weights(model)  # the module's other tests share the model


def test_decode_steps_write_their_logits_into_one_reused_buffer(pair, monkeypatch):
    """The fused CPU step writes each decode step's logits into the engine's buffer (no fresh tensor per step: a
    server's are 39 MB), and reusing it changes no output: every step's logits are read before the next is made."""
    from glmtorch.fastpath import FusedDecodeStep
    from glmtorch.serve.engine import Engine

    model, tokenizer = pair
    batch = prompts(12, seed=6)
    params = [SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8 if i % 2 else 0, seed=i,
                             repetition_penalty=1.3 if i % 3 == 0 else 1.0) for i in range(12)]
    llm = glmtorch.LLM(model, tokenizer, prefix_caching=False)
    if not isinstance(llm.engine.step_fn, FusedDecodeStep):
        pytest.skip("no fused CPU step here (kernels off)")
    seen = []
    real_step = Engine._op_step

    def step(self, *args):
        logits = real_step(self, *args)
        seen.append(logits.data_ptr() == self.logits.data_ptr())
        return logits

    monkeypatch.setattr(Engine, "_op_step", step)
    got = outputs(llm, batch, params)
    assert len(seen) >= 9 and all(seen)
    monkeypatch.setattr(Engine, "_op_step", real_step)
    monkeypatch.setattr(Engine, "_logits_buffer", lambda self, rows: torch.empty(rows, model.config.vocab_size))
    fresh = glmtorch.LLM(model, tokenizer, prefix_caching=False)
    assert outputs(fresh, batch, params) == got


def test_a_resumed_request_streams_each_token_once(pair):
    """Preemption is invisible to the client: the text events of a preempted request are its output exactly
    once, in order."""
    model, tokenizer = pair
    per_block = model.kv_block_bytes(16)
    llm = glmtorch.LLM(model, tokenizer, max_num_seqs=3, kv_cache_memory=9 * per_block, prefix_caching=False)
    engine = llm.engine
    events = [[] for _ in range(3)]
    requests = [Request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), events[i].append)
                for i, p in enumerate(prompts(3, seed=4))]
    for r in requests:
        engine.submit(r)
    engine.run(until_idle=True)
    assert engine.preemptions > 0 and any(r.preempted for r in requests)
    for r, evs in zip(requests, events):
        text = "".join(e.text for e in evs if e.kind == "text")
        assert evs[-1].kind == "done" and evs[-1].completion_tokens == 40
        assert text == tokenizer.decode(r.history[0, len(r.prompt_ids):].tolist())


def test_random_traffic_on_a_small_pool_leaks_nothing_and_changes_no_output(pair):
    """Requests of random lengths sharing random prefixes, some cancelled mid-stream, some sampled with seeds, on a
    pool that forces preemption and eviction: every request that runs to the end gives its text alone, and
    afterwards every block, table row and table entry is free again."""
    import random

    model, tokenizer = pair
    per_block = model.kv_block_bytes(16)
    rng = random.Random(7)
    shared = [prompts(1, seed=100 + i)[0] * 2 for i in range(3)]
    cases = []
    for i in range(30):
        head = rng.choice(shared)[:rng.randrange(0, 60)]
        prompt = head + prompts(1, seed=200 + i)[0][:rng.randrange(1, 20)]
        params = SamplingParams(max_tokens=rng.randrange(1, 50), ignore_eos=True, seed=i,
                                temperature=rng.choice([0, 0, 0.8]))
        cases.append((prompt, params, rng.random() < 0.2))
    engine = glmtorch.LLM(model, tokenizer, max_num_seqs=6, kv_cache_memory=18 * per_block).engine
    requests = []
    for prompt, params, cancel in cases:
        seen: list = []
        r = Request(prompt, params, seen.append)
        if cancel:  # the client goes away after its third piece of text
            r.emit = lambda e, r=r, seen=seen: (seen.append(e), sum(x.kind == "text" for x in seen) >= 3
                                                and r.cancelled.set())
        requests.append((r, seen))
        engine.submit(r)
    engine.run(until_idle=True)
    assert engine.preemptions > 0
    finished = 0
    for (r, seen), (prompt, params, cancel) in zip(requests, cases):
        if cancel and r.generated < params.max_tokens:
            continue
        finished += 1
        assert seen[-1].kind == "done" and r.generated == params.max_tokens
        got = r.history[0, len(prompt):len(prompt) + r.generated].tolist()
        assert got == alone(model, tokenizer, [prompt], params)[0]
    assert finished >= 20
    assert not engine.running and not engine.waiting
    assert engine.pool.num_free() == engine.pool.usable and sorted(engine.free_rows) == list(range(6))
    assert not engine.tables.any() and not any(engine.pool.holders)


def test_a_pass_emits_its_events_after_its_last_row(pair):
    """Events go out when the pass that made them ends (one wake-up of the server's loop per step, not one per
    row), every one of them, in order, also when the pass fails after some rows."""
    model, tokenizer = pair
    engine = glmtorch.LLM(model, tokenizer, max_num_seqs=4).engine
    seen: list[tuple[int, str, bool]] = []
    for i, ids in enumerate(prompts(3, seed=5)):
        engine.submit(Request(ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                              lambda e, i=i: seen.append((i, e.kind, engine.outbox is None))))
    engine.run(until_idle=True)
    assert all(outside for _, _, outside in seen)  # never from inside a pass
    assert sorted(i for i, kind, _ in seen if kind == "done") == [0, 1, 2]
    seen.clear()
    with pytest.raises(RuntimeError, match="mid-pass"):
        with engine._holding_events():
            engine._emit(Request([1], SamplingParams(), lambda e: seen.append((9, e.kind, engine.outbox is None))),
                         Event("text", text="x"))
            raise RuntimeError("mid-pass")
    assert seen == [(9, "text", True)] and engine.outbox is None


def test_an_idle_engine_lets_arriving_requests_in_before_it_prefills(pair, monkeypatch):
    """With nothing decoding and the front end still taking requests in (`arriving`), the engine waits for them
    and prefills them in one pass, as soon as the last is submitted or refused (each told to the engine, which
    does not poll); a request that never finishes arriving (a client trickling its body) holds an idle engine for
    arrival_wait at most; GLMTORCH_ARRIVAL_WAIT sets it, checked."""
    import threading
    import time

    from glmtorch.serve.server import build_engine

    model, tokenizer = pair
    engine = build_engine(model, tokenizer, max_num_seqs=4, thread=False)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    done = []
    first, second = prompts(2, seed=3)

    def submitted():  # as the server's front end submits: no longer counted as arriving, then handed over
        time.sleep(0.05)
        engine.arriving -= 1
        engine.submit(Request(second, params, done.append))

    def refused():  # answered with an error, never submitted
        time.sleep(0.05)
        engine.end_arrival()

    # A wait far longer than the late requests' 0.05 s (the default, 0.05 s, raced it on a slow CI machine); the
    # engine must stop waiting as soon as the last one is in, well before it.
    engine.arrival_wait = 5.0
    for late_ones in ([submitted], [submitted, refused], [refused, submitted]):
        engine.arriving = 1 + len(late_ones)
        engine.arriving -= 1
        engine.submit(Request(first, params, done.append))
        passes, start, before = engine.prefill_passes, time.perf_counter(), len(done)
        late = threading.Thread(target=lambda: [arrive() for arrive in late_ones])
        late.start()
        engine.run(until_idle=True)
        late.join()
        assert engine.prefill_passes - passes == 1 and time.perf_counter() - start < 4, late_ones
        assert sum(e.kind == "done" for e in done[before:]) == 2 and engine.arriving == 0
    engine.arriving, engine.arrival_wait = 1, 0.2  # one that never arrives
    start, passes = time.perf_counter(), engine.prefill_passes
    engine.submit(Request(first, params, done.append))
    engine.run(until_idle=True)
    assert 0.2 <= time.perf_counter() - start < 5 and engine.prefill_passes - passes == 1
    assert sum(e.kind == "done" for e in done) == 7
    from glmtorch.serve.engine import arrival_wait_from_env

    for text, seconds in (("", 0.05), ("0", 0.0), (" 0.2 ", 0.2)):
        monkeypatch.setenv("GLMTORCH_ARRIVAL_WAIT", text)
        assert arrival_wait_from_env() == seconds
    for text in ("soon", "-1", "nan", "inf", "1e9"):
        monkeypatch.setenv("GLMTORCH_ARRIVAL_WAIT", text)
        with pytest.raises(ValueError, match="GLMTORCH_ARRIVAL_WAIT must be a number of seconds"):
            build_engine(model, tokenizer, max_num_seqs=4, thread=False)
