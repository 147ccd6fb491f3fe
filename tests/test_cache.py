"""The paged KV cache (cache.PagedKVCache): attention through block tables equals attention over a contiguous
cache, prefill and decode, on odd configs, in the layer-by-layer path and in the fused C++ decode step."""

import pytest
import torch

import glmtorch
from glmtorch import kernels
from glmtorch.cache import PagedKVCache
from glmtorch.fastpath import compiled_decode_step, decode_step, fused_step_supported
from conftest import CONFIGS, make_hf_model, rel_err, save_hf


def _scattered_tables(rows: int, per_row: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """Block tables naming distinct blocks in a scrambled order (never block 0)."""
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    return order[:rows * per_row].view(rows, per_row)


@torch.no_grad()
@pytest.mark.parametrize("in_place", [True, False], ids=["read-in-place", "gathered"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("block", [4, 16])
def test_attention_through_block_tables_equals_contiguous(tmp_path, name, in_place, block, monkeypatch):
    """Two prompts of different lengths prefilled together (padded) into scattered blocks of 4 or 16 tokens (16: a
    CPU pool's keys stored by element, cache.keys_by_element), then decoded at different positions for several
    steps: logits equal a static cache's (fp32 < 1e-6), whether attention reads the blocks in place (the C++
    kernel) or gathers them for SDPA, and the fused step reads and writes the same blocks."""
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")  # the fused step for 2 rows, whatever timing says here
    monkeypatch.setattr("glmtorch.cache.IN_PLACE_MAX_TOKENS", 16 if in_place else 0)
    monkeypatch.setenv("GLMTORCH_PREFILL_ATTENTION", "in_place" if in_place else "gathered")
    model = glmtorch.AutoModelForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS[name]), tmp_path))
    prompts = [torch.randint(1, 160, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (11, 6)]
    T, steps = 11, 6
    ids = torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    real = (torch.arange(T) < lengths[:, None]).long()
    paged = model.new_paged_cache(20, block)
    assert isinstance(paged, PagedKVCache) and not paged.key_buffer.any()
    assert (paged.key_buffer.stride(-1) != 1) == (block == 16 and kernels.available())
    table = _scattered_tables(2, 5, 20)
    static = model.new_static_cache(2, 20)
    got = model.last_token_logits(ids, lengths, real, paged.view(table[:, :3], T), torch.arange(T))
    static.length = T
    expected = model.last_token_logits(ids, lengths, real, static, torch.arange(T))
    assert rel_err(got, expected) < 1e-6
    tokens = got.argmax(-1)[:, None]
    positions = lengths[:, None].clone()
    # the layer-by-layer step through the table (< 1e-6) and the fused C++ step (< 1e-5: its own sums)
    steppers = [(decode_step, 1e-6)] + ([(compiled_decode_step(model), 1e-5)] if fused_step_supported(model) else [])
    if len(steppers) == 2:
        steppers[1][0]._ensure_plan(model)
        assert steppers[1][0]._kernels_win(model, 2)
    for step in range(steps):
        window = int(positions.max()) + 1
        mask = torch.ones(2, window, dtype=torch.long)
        view = paged.view(table[:, :-(-window // block)], window)
        want = decode_step(model, tokens, positions, positions, mask, static)
        for stepper, tolerance in steppers:  # each writes the same slot of the same block: the same keys again
            assert rel_err(stepper(model, tokens, positions, positions, mask, view).float(), want.float()) < tolerance
        tokens, positions = want.argmax(-1)[:, None], positions + 1
    # the written slots hold what the static cache holds, block by block
    layers, _, kv_heads, block, dim = paged.key_buffer.shape
    for row, length in enumerate(positions[:, 0].tolist()):
        for mine, theirs in ((paged.key_buffer, static.key_buffer), (paged.value_buffer, static.value_buffer)):
            slots = mine[:, table[row]].transpose(1, 2).reshape(layers, kv_heads, -1, dim)
            assert rel_err(slots[:, :, :length], theirs[:, row, :, :length]) < 1e-6


@torch.no_grad()
def test_a_bf16_pool_read_in_place_agrees_with_the_gathered_one(tmp_path, monkeypatch):
    """bf16 keys and values widened in the kernel (fp32 sums) against SDPA in bf16: within bf16 rounding."""
    model = glmtorch.AutoModelForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path),
                                                          dtype="bfloat16")
    ids = torch.randint(1, 160, (2, 9), generator=torch.Generator().manual_seed(5))
    logits = []
    for limit, longer in ((16, "in_place"), (0, "gathered")):
        monkeypatch.setattr("glmtorch.cache.IN_PLACE_MAX_TOKENS", limit)
        monkeypatch.setenv("GLMTORCH_PREFILL_ATTENTION", longer)
        paged = model.new_paged_cache(8, 4)
        assert paged.key_buffer.dtype == torch.bfloat16
        view = paged.view(_scattered_tables(2, 3, 8), 9)
        logits.append(model(ids, past_key_values=view, cache_position=torch.arange(9)[None].expand(2, 9)).logits)
    assert rel_err(logits[0].float(), logits[1].float()) < 2e-2


def test_a_table_too_short_for_the_window_is_refused():
    cache = PagedKVCache(1, 4, 1, 4, 8)
    with pytest.raises(ValueError, match="does not cover"):
        cache.view(torch.tensor([[1, 2]]), 9)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_prefill_read_in_place_equals_the_gathered_one(tmp_path, monkeypatch, dtype):
    """Passes longer than IN_PLACE_MAX_TOKENS a row (a padded batch of fresh prompts of 40 and 23 tokens, then 30
    more tokens of each after its cached prefix) attend the same whether they read the pool in place or gather it
    for SDPA: fp32 < 1e-5, bf16 within its rounding."""
    model = glmtorch.AutoModelForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path),
                                                          dtype=str(dtype).removeprefix("torch."))
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 160, (2, 40), generator=g)
    lengths = torch.tensor([40, 23])
    more = torch.randint(1, 160, (2, 30), generator=g)
    table = _scattered_tables(2, 18, 40)
    results = []
    for read in ("in_place", "gathered"):
        monkeypatch.setenv("GLMTORCH_PREFILL_ATTENTION", read)
        paged = model.new_paged_cache(40, 4)
        first = model.last_token_logits(ids, lengths, None, paged.view(table[:, :10], 40), torch.arange(40))
        positions = lengths[:, None] + torch.arange(30)  # each row's 30 tokens right after its prompt
        second = model.last_token_logits(more, torch.tensor([30, 30]), None, paged.view(table, 70), positions)
        results.append(torch.cat([first, second]).float())
    assert rel_err(results[0], results[1]) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_how_a_long_prefill_attends_is_measured_once_and_kept(timed_prefill_attention, monkeypatch):
    """The choice between reading in place and gathering is timed once per head shape and pair of buckets (new
    tokens, slots), and kept in the dispatch table (a new process reads it, measuring nothing); past LONGEST_TIMED
    the longest bucket decides; a forced value is honoured, a wrong one refused by name."""
    from glmtorch import cache, dispatch

    calls, outcome = timed_prefill_attention
    longest = cache.LONGEST_TIMED
    outcome[longest, longest] = "gathered"
    assert cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 40)  # a fresh prompt: (64, 64)
    assert cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 40, 40)  # the same pair, not timed again
    assert cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 5000, 30)  # 30 new after 4,970 cached
    assert not cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 9000)  # a fresh prompt past the longest
    assert [c[3:] for c in calls] == [(64, 64), (32, longest), (longest, longest)]
    assert dispatch.decisions()[f"prefill attention bfloat16 16 heads over 2 of 64 new<={longest} "
                                f"slots<={longest}"] == "gathered"
    dispatch.forget()
    cache._in_place_wins.cache_clear()
    assert not cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 3000)
    assert cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 3000, 17)
    assert len(calls) == 3  # read from the file
    monkeypatch.setenv("GLMTORCH_PREFILL_ATTENTION", "in_place")
    assert cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 5000)
    monkeypatch.setenv("GLMTORCH_PREFILL_ATTENTION", "sometimes")
    with pytest.raises(ValueError, match="GLMTORCH_PREFILL_ATTENTION='sometimes'"):
        cache.prefill_reads_in_place(torch.bfloat16, 16, 2, 64, 40)


@pytest.mark.parametrize("new, length", [(64, 64), (32, 160)], ids=["fresh", "after-a-prefix"])
def test_the_prefill_attention_timing_runs_both_ways(new, length):
    """The measurement itself: both ways run on a pass of PREFILL_PASS_TOKENS new tokens (fresh prompts, and
    prompts after a cached prefix: the gather counted) and one of them is named."""
    from glmtorch import cache, kernels

    if not kernels.available():
        pytest.skip("kernels not built")
    assert cache._time_prefill_attention(torch.float32, 4, 2, 32, new, length) in ("in_place", "gathered")


@pytest.mark.parametrize("new, length", [(64, 64), (32, 160)], ids=["fresh", "after-a-prefix"])
def test_the_ways_a_prefill_pass_attends_agree(new, length):
    """What the measurement (and bench_paged_attention --prefill) times: the tiles, SDPA on the gathered keys and
    the row-at-a-time kernel give the same attention (fp32 < 1e-5)."""
    from glmtorch import cache, kernels

    if not kernels.available():
        pytest.skip("kernels not built")
    q, ways = cache.prefill_attention_ways(torch.float32, 8, 2, 32, 3, new, length)
    out = {name: way(q) for name, way in ways.items()}
    assert rel_err(out["in_place"], out["gathered"]) < 1e-5
    assert rel_err(out["row_at_a_time"], out["gathered"]) < 1e-5
