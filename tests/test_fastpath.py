"""The fast decode path: static cache == dynamic cache, compiled == eager, quantized layers, the benchmark."""

import json
import os

import pytest
import torch

import glmtorch
from glmtorch import kernels
from glmtorch.cache import StaticCache
from glmtorch.fastpath import FusedDecodeStep, GemvLinear, compiled_decode_step, decode_step, fused_step_supported
from glmtorch.quantize import Int4Linear, Int8Linear
from conftest import CONFIGS, make_hf_model, rel_err, save_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = make_hf_model(**CONFIGS["gqa"])
    path = save_hf(ref, tmp_path_factory.mktemp("fast"))
    return ref, path


@torch.no_grad()
def test_static_cache_matches_dynamic_cache(pair):
    _, path = pair
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids = torch.randint(1, 160, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = StaticCache(2, 2, 2, 64, 16)
    mask = torch.ones(2, 64, dtype=torch.long)
    a = model(ids[:, :8], attention_mask=mask, past_key_values=cache, cache_position=torch.arange(8)).logits
    steps = [model(ids[:, t:t + 1], attention_mask=mask, past_key_values=cache, cache_position=torch.tensor([t])).logits
             for t in range(8, 12)]
    assert rel_err(torch.cat([a, *steps], 1), full) < 1e-5
    assert cache.seq_lengths.tolist() == [12, 12]


@torch.no_grad()
def test_per_row_cache_positions(pair):
    """Rows at different lengths in one batch (continuous batching) equal each row alone."""
    _, path = pair
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    cache = StaticCache(2, 2, 2, 32, 16)
    # prefill each row into its own slot, then decode both together at different positions
    single = glmtorch.StaticCache(2, 1, 2, 32, 16)
    ref_a = model(torch.cat([a, torch.tensor([[20]])], 1)).logits[:, -1]
    ref_b = model(torch.cat([b, torch.tensor([[21]])], 1)).logits[:, -1]
    for row, ids in ((0, a), (1, b)):
        single.reset()
        model(ids, past_key_values=single, cache_position=torch.arange(ids.shape[1]))
        for layer in range(2):
            cache.keys[layer][row] = single.keys[layer][0]
            cache.values[layer][row] = single.values[layer][0]
    positions = torch.tensor([[5], [3]])
    out = model(torch.tensor([[20], [21]]), past_key_values=cache, cache_position=positions, position_ids=positions,
                attention_mask=torch.ones(2, 32, dtype=torch.long)).logits[:, -1]
    assert rel_err(out[0], ref_a[0]) < 1e-5 and rel_err(out[1], ref_b[0]) < 1e-5


@pytest.mark.slow
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")  # no eager fallback
@torch.no_grad()
def test_compiled_decode_matches_eager_and_does_not_recompile(pair, monkeypatch):
    ref, path = pair
    monkeypatch.setenv("GLMTORCH_COMPILE", "1")
    monkeypatch.setenv("GLMTORCH_FUSED_STEP", "0")  # the compiled step itself (bf16 models and GPUs take it)
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    assert all(type(m) is not torch.nn.Linear for m in model.modules()) and isinstance(model.lm_head, GemvLinear)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=[], pad_token_id=0)
    expected = ref.generate(ids, max_new_tokens=12, **kw)
    assert torch.equal(model.generate(ids, max_new_tokens=12, **kw), expected)
    from torch._dynamo.utils import counters

    compiles = counters["stats"]["unique_graphs"]
    # a new prompt length and a new max_new_tokens reuse the compiled step
    shorter = model.generate(ids[:, 1:], max_new_tokens=9, **{**kw, "attention_mask": mask[:, 1:]})
    assert shorter.shape == (2, 5 + 9)
    assert counters["stats"]["unique_graphs"] == compiles
    # the compiled step's logits (its attention is the decode form, not SDPA) against the reference's
    T, new = ids.shape[1], torch.tensor([[3], [4]])
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_static_cache(2, 16)
    cache.length = T
    model(ids, attention_mask=mask, position_ids=positions[:, :T], past_key_values=cache,
          cache_position=torch.arange(T))
    logits = compiled_decode_step(model)(model, new, positions[:, T:], torch.tensor([T]), full_mask, cache)
    expected = ref(torch.cat([ids, new], 1), attention_mask=full_mask, position_ids=positions).logits[:, -1]
    assert rel_err(logits, expected) < 1e-5


@pytest.mark.slow
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")
@torch.no_grad()
def test_steps_that_attend_the_whole_cache_match_the_reference(pair, monkeypatch):
    """What a GPU's CUDA-graph steps do (fastpath._compiled_step), here on the CPU: each step attends the whole
    static cache, its length rounded up to 256 slots (one shape for the call, few for a process); causality
    hides the slots not yet written, so the tokens are the reference's."""
    from glmtorch import fastpath

    ref, path = pair
    monkeypatch.setattr(fastpath, "cuda_graphs_enabled", lambda model: True)
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    model._glmtorch_decode_step = step = fastpath._compiled_step(model)  # not inside the CPU's fused step
    assert step.attends_whole_cache
    lengths, attended = [], []
    new_cache = model.new_static_cache
    monkeypatch.setattr(model, "new_static_cache", lambda b, n: (lengths.append(n), new_cache(b, n))[1])

    def spy(*args):
        attended.append(args[4].shape[1])
        return step(*args)

    spy.attends_whole_cache = True
    model._glmtorch_decode_step = spy
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    kw = dict(attention_mask=(ids != 0).long(), do_sample=False, eos_token_id=[], pad_token_id=0)
    expected = ref.generate(ids, max_new_tokens=12, **kw)
    assert torch.equal(model.generate(ids, max_new_tokens=12, **kw), expected)
    assert lengths == [256] and set(attended) == {256} and len(attended) == 11
    # the next call of that shape gets the same cache back (the graphs' addresses), emptied first
    kept = model._glmtorch_kept_cache
    shorter = {**kw, "attention_mask": kw["attention_mask"][:, 1:]}
    assert torch.equal(model.generate(ids[:, 1:], max_new_tokens=12, **shorter),
                       ref.generate(ids[:, 1:], max_new_tokens=12, **shorter))
    assert lengths == [256] and model._glmtorch_kept_cache is kept and not kept.lent
    # one lent out meanwhile: another call gets its own; one of another shape replaces the kept cache
    assert fastpath.lend_static_cache(model, 2, 256) is kept
    assert torch.equal(model.generate(ids, max_new_tokens=12, **kw), expected)
    assert lengths == [256, 256] and model._glmtorch_kept_cache is kept
    fastpath.return_static_cache(kept)
    model.generate(ids[1:], max_new_tokens=12, **{**kw, "attention_mask": kw["attention_mask"][1:]})
    assert len(lengths) == 3 and model._glmtorch_kept_cache.seq_lengths.shape == (1,)


def _prefilled(model, ids, mask, capacity=16):
    """A static cache holding the (left-padded) prompts, and the decode step's inputs for one more token."""
    T = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=torch.long)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_static_cache(ids.shape[0], capacity)
    cache.length = T
    model(ids, attention_mask=mask, position_ids=positions[:, :T], past_key_values=cache,
          cache_position=torch.arange(T))
    return cache, positions, full_mask


@torch.no_grad()
@pytest.mark.parametrize("arch", ["Glm", "Glm4"])  # GLM-4-9B; GLM-4-0414 with its sandwich norms
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_decode_step_matches_reference(tmp_path, name, arch, monkeypatch):
    """The whole-step C++ kernel (fp32, int8, int4 weights) against transformers and against the eager step, on
    a left-padded batch; then rows at different positions (the server's batches) against each row alone.
    Every product takes the kernels here: the int8 / int4 kernels quantize activations in blocks of 32 (as
    llama.cpp does), so a widened path that dispatch may pick for other row counts differs by that rounding."""
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")
    ref = make_hf_model(f"{arch}ForCausalLM", **CONFIGS[name])
    path = save_hf(ref, tmp_path)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask, new = (ids != 0).long(), torch.tensor([[3], [4]])
    for quantize in (None, "int8", "int4"):
        model = glmtorch.AutoModelForCausalLM.from_pretrained(path, **({"quantize": quantize} if quantize else {}))
        assert type(model).__name__ == f"{arch}ForCausalLM"
        if CONFIGS[name].get("hidden_act", "silu") != "silu":  # outside what the C++ step does: the compiled one
            assert not fused_step_supported(model)
            return
        assert fused_step_supported(model)
        step = compiled_decode_step(model)
        assert isinstance(step, FusedDecodeStep)
        cache, positions, full_mask = _prefilled(model, ids, mask)
        T = ids.shape[1]
        eager_cache, _, _ = _prefilled(model, ids, mask)
        fused = step(model, new, positions[:, T:], torch.tensor([T]), full_mask, cache)
        assert step.plan is not None and cache.seq_lengths.tolist() == [T + 1] * 2
        eager = decode_step(model, new, positions[:, T:], torch.tensor([T]), full_mask, eager_cache)
        assert rel_err(fused, eager) < 1e-5
        for mine, theirs in ((cache.key_buffer, eager_cache.key_buffer), (cache.value_buffer, eager_cache.value_buffer)):
            assert rel_err(mine, theirs) < 1e-6  # the new keys and values written where eager writes them
        if quantize is None:
            expected = ref(torch.cat([ids, new], 1), attention_mask=full_mask, position_ids=positions).logits[:, -1]
            assert rel_err(fused, expected) < 1e-5
    # per-row slots: row 0 decodes at position 5, row 1 at 3, in one step
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    cache = model.new_static_cache(2, 16)
    for row, prompt in ((0, a), (1, b)):
        model(prompt, past_key_values=cache.rows(row, row + 1), cache_position=torch.arange(prompt.shape[1]))
    slots = torch.tensor([[5], [3]])
    out = step(model, torch.tensor([[20], [21]]), slots, slots, torch.ones(2, 6, dtype=torch.long), cache)
    for row, prompt, token in ((0, a, 20), (1, b, 21)):
        alone = model(torch.cat([prompt, torch.tensor([[token]])], 1)).logits[0, -1]
        assert rel_err(out[row], alone) < 1e-5


@pytest.fixture
def two_threads():
    """Two intra-op threads (a batch split by rows needs two), whatever the machine gives by default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=[2, 3, 5], ids=lambda n: f"{n}threads")
def threads(request):
    """The machines people run on have other core counts than these tests' two: the work the threads share out
    (a product's columns, a batch's rows) is split differently at 3 and 5 (on two cores too, oversubscribed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@torch.no_grad()
@pytest.mark.parametrize("paged", [False, True], ids=["static", "paged"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_batch_split_by_rows_equals_one_split_by_columns(tmp_path, monkeypatch, threads, paged, quantize):
    """The fused step with each thread running every layer for its share of the rows gives the logits and writes
    the keys and values of the step whose products are split by columns, for 2, 3, 5 and 37 rows at different
    positions (odd shares; 37: three chunks of rows for two threads), on a static cache (each share naming its
    cache rows) and through scattered block tables; and it did split (the plan counts such steps). With 2, 3 and 5
    threads: the two ways share the work out independently (by columns, every product; by rows, each share on one
    thread), so a share lost or doubled at some thread count shows as a difference. Each row's greedy token, which
    the step finds where it runs the LM head (each share its own rows'), is its logits' argmax both ways."""
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")
    model = glmtorch.AutoModelForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path),
                                                          **({"quantize": quantize} if quantize else {}))
    step = compiled_decode_step(model)
    for rows in (2, 3, 5, 37):
        lengths = torch.tensor([7, 3, 9, 1, 5] * 8)[:rows]
        window = int(lengths.max()) + 1
        outputs = {}
        for way in ("columns", "rows"):
            monkeypatch.setenv("GLMTORCH_STEP_SPLIT", way)
            if paged:
                cache = model.new_paged_cache(4 * rows + 1, 4)
                table = (torch.randperm(4 * rows, generator=torch.Generator().manual_seed(rows)) + 1).view(rows, 4)
                cache = cache.view(table[:, :-(-window // 4)], window)
            else:
                cache = model.new_static_cache(rows, 16)
            torch.manual_seed(rows)  # the same cached keys and values both ways
            for buffer in (cache.key_buffer, cache.value_buffer):
                buffer.copy_(torch.randn_like(buffer))
            tokens = torch.arange(3, 3 + rows)[:, None]
            mask = (torch.arange(window) <= lengths[:, None]).long()
            before = step.plan.split_steps() if step.plan is not None else 0
            greedy = torch.full((rows,), -1)
            logits = step(model, tokens, lengths[:, None], lengths[:, None], mask, cache, greedy=greedy).clone()
            assert step.plan.split_steps() - before == (way == "rows")
            assert torch.equal(greedy, logits.argmax(-1)), way
            outputs[way] = logits, cache.key_buffer.clone(), cache.value_buffer.clone()
        for split_by_rows, split_by_columns in zip(outputs["rows"], outputs["columns"]):
            assert rel_err(split_by_rows, split_by_columns) < 1e-6
    if not paged:  # a verify pass's rows are one sequence, each reading the keys the others write: never split
        monkeypatch.setenv("GLMTORCH_STEP_SPLIT", "rows")
        cache, before = model.new_static_cache(1, 16), step.plan.split_steps()
        assert step.verify(model, torch.tensor([3, 4, 5]), 0, 0, torch.ones(1, 3, dtype=torch.long), cache) is not None
        assert step.plan.split_steps() == before


def test_the_row_split_is_chosen_on_the_steps_themselves(monkeypatch, two_threads):
    """RowSplitChoice runs the first PAIRS pairs of a row bucket's steps once each way, in alternating order, after
    one pair it does not count (each way's first step pays for its first use), keeps the way with the lower median
    ratio, and then always takes it; a changed row count restarts a pair; a batch of one is never split;
    GLMTORCH_STEP_SPLIT forces a way, and names what it takes when it is wrong."""
    from glmtorch.fastpath import RowSplitChoice

    monkeypatch.delenv("GLMTORCH_STEP_SPLIT", raising=False)
    for rows_time, expected in ((0.9, True), (1.1, False)):
        choice = RowSplitChoice()
        ways = []
        for _ in range(2 * (choice.PAIRS + 1)):
            way = choice.pick(64)
            ways.append(way)
            # the uncounted first pair says the opposite, ten times over
            seconds = ((10.0 if rows_time < 1 else 0.1) if len(ways) <= 2 else rows_time) if way else 1.0
            choice.record(64, way, seconds)
        assert ways[:6] == [False, True, False, True, True, False]  # columns first, then rows first
        assert ways.count(True) == ways.count(False) == choice.PAIRS + 1
        assert len(choice.ratios[64]) == choice.PAIRS and all(r == rows_time for r in choice.ratios[64])
        assert all(choice.pick(64) is expected for _ in range(3)) and choice.pick(40) is expected  # one bucket
        assert choice.pick(16) is False  # another bucket starts its own pairs
    choice = RowSplitChoice()
    choice.record(64, choice.pick(64), 1.0)
    assert choice.pick(63) is False  # 63 rows do not finish a pair begun at 64: a new one begins
    choice.record(63, False, 1.0)
    assert choice.pick(63) is True and choice.pick(1) is None
    monkeypatch.setenv("GLMTORCH_STEP_SPLIT", "rows")
    assert choice.pick(64) is True
    monkeypatch.setenv("GLMTORCH_STEP_SPLIT", "columns")
    assert choice.pick(64) is False
    forced = RowSplitChoice()  # steps run a forced way decide nothing: unforced, the bucket is measured afresh
    for _ in range(2 * (forced.PAIRS + 1)):
        forced.record(64, forced.pick(64), 1.0)
    assert forced.chosen == {}
    monkeypatch.setenv("GLMTORCH_STEP_SPLIT", "diagonal")
    with pytest.raises(ValueError, match="GLMTORCH_STEP_SPLIT='diagonal': expected rows or columns"):
        choice.pick(64)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["Glm", "Glm4"])
@pytest.mark.parametrize("product", ["kernel", "amx"])
def test_fused_step_of_a_bf16_model_computes_in_fp32(tmp_path, arch, product, monkeypatch):
    """A bf16 model's fused step reads its bf16 weights, embedding and cache and computes in fp32 (on the AMX tiles
    its products' inputs are rounded to bf16, as the eager step's are): closer to the fp32 reference than its own
    eager bf16 step, and it writes the cache the eager step writes (within bf16 rounding). Taken where timed faster
    (forced here)."""
    if product == "amx" and not glmtorch.kernels.amx_available():
        pytest.skip("no AMX-BF16 tiles on this CPU (or not granted)")
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", product)
    ref = make_hf_model(f"{arch}ForCausalLM", **CONFIGS["gqa"])
    path = save_hf(ref, tmp_path)
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")
    assert fused_step_supported(model)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask, new, T = (ids != 0).long(), torch.tensor([[3], [4]]), ids.shape[1]
    step = compiled_decode_step(model)
    cache, positions, full_mask = _prefilled(model, ids, mask)
    eager_cache, _, _ = _prefilled(model, ids, mask)
    fused = step(model, new, positions[:, T:], torch.tensor([T]), full_mask, cache)
    assert step.plan is not None and fused.dtype == torch.float32
    assert bool(step.amx_bits) == (product == "amx")  # the plan's bf16 products on the tiles, or not
    eager = decode_step(model, new, positions[:, T:], torch.tensor([T]), full_mask, eager_cache)
    exact = ref(torch.cat([ids, new], 1), attention_mask=full_mask, position_ids=positions).logits[:, -1]
    assert rel_err(fused, exact) < rel_err(eager.float(), exact) < 2e-2
    assert rel_err(cache.key_buffer.float(), eager_cache.key_buffer.float()) < 1e-2


@torch.no_grad()
def test_fused_decode_step_falls_back(pair, monkeypatch):
    """Batches past the kernels' row limit, and models it does not cover (fp16 here, after .to()), take the
    compiled / eager step, with the same results."""
    _, path = pair
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    calls = []
    step = FusedDecodeStep(lambda *args: calls.append(1) or decode_step(*args))
    monkeypatch.setattr(glmtorch.kernels, "FLOAT_MAX_ROWS", 1)
    cache, positions, full_mask = _prefilled(model, ids, mask)
    greedy = torch.full((2,), -1)  # each row's greedy token, found from the fallback's logits
    out = step(model, torch.tensor([[3], [4]]), positions[:, 3:], torch.tensor([3]), full_mask, cache, greedy=greedy)
    assert calls == [1] and step.plan is not None and step.max_rows == 1
    assert torch.equal(greedy, out.argmax(-1))
    monkeypatch.undo()
    model.to(torch.float16)
    cache, positions, full_mask = _prefilled(model, ids, mask)
    greedy.fill_(-1)
    out16 = step(model, torch.tensor([[3], [4]]), positions[:, 3:], torch.tensor([3]), full_mask, cache, greedy=greedy)
    assert calls == [1, 1] and step.plan is None and out16.dtype == torch.float16  # the model's dtype
    assert rel_err(out16, out) < 2e-2 and torch.equal(greedy, out16.argmax(-1))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GLMTORCH_FUSED_STEP", "0")
        assert not fused_step_supported(model.float())


@torch.no_grad()
@pytest.mark.parametrize("mode,logit_tol,ppl_tol", [("int8", 2e-2, 0.01), ("int4", 2e-1, 0.15)])
def test_weight_only_quantization(tmp_path, pair, mode, logit_tol, ppl_tol):
    _, path = pair
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    quant = glmtorch.GlmForCausalLM.from_pretrained(path, quantize=mode)
    cls = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(quant.model.layers[0].mlp.down_proj, cls) and isinstance(quant.lm_head, cls)
    ids = torch.randint(1, 160, (4, 32), generator=torch.Generator().manual_seed(3))
    exact, approx = model(ids, labels=ids), quant(ids, labels=ids)
    assert rel_err(approx.logits, exact.logits) < logit_tol
    assert abs(float(approx.loss.exp() / exact.loss.exp()) - 1) < ppl_tol  # perplexity cost
    quant.save_pretrained(tmp_path / mode)
    config = json.loads((tmp_path / mode / "config.json").read_text())
    assert config["quantization"]["mode"] == mode
    size = os.path.getsize(tmp_path / mode / "model.safetensors")
    full = sum(p.numel() * 4 for p in model.parameters())
    assert size < (0.4 if mode == "int8" else 0.3) * full
    again = glmtorch.GlmForCausalLM.from_pretrained(tmp_path / mode)
    assert torch.equal(again(ids).logits, approx.logits)
    if mode == "int4":  # fp16 scales, as saved, in an fp32 model
        assert again.lm_head.scales.dtype == torch.float16 and again.dtype == torch.float32
    with pytest.raises(ValueError, match="stored as"):
        glmtorch.GlmForCausalLM.from_pretrained(tmp_path / mode, quantize="int4" if mode == "int8" else "int8")


@torch.no_grad()
def test_int4_checkpoint_with_wider_scales_still_loads(tmp_path, pair):
    # int4 checkpoints saved before scales were kept in fp16 hold them in the model's dtype (fp32 here)
    from safetensors.torch import load_file, save_file

    _, path = pair
    quant = glmtorch.GlmForCausalLM.from_pretrained(path, quantize="int4")
    quant.save_pretrained(tmp_path / "int4")
    weights = tmp_path / "int4" / "model.safetensors"
    tensors = {k: (v.float() if k.endswith(".scales") else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    again = glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "int4")
    assert again.lm_head.scales.dtype == torch.float16
    ids = torch.randint(1, 160, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(again(ids).logits, quant(ids).logits)  # fp16 values widened and narrowed: exact


def test_bad_quantize_arguments(pair):
    _, path = pair
    with pytest.raises(ValueError, match="quantize='int3'"):
        glmtorch.GlmForCausalLM.from_pretrained(path, quantize="int3")
    with pytest.raises(ValueError, match="group_size"):
        glmtorch.GlmForCausalLM.from_pretrained(path, quantize="int4", group_size=3)
    with pytest.raises(ValueError, match=r"groups of 128 inputs, but model\.layers\.0\.self_attn\.qkv_proj takes 64"):
        glmtorch.GlmForCausalLM.from_pretrained(path, quantize="int4", group_size=128)  # hidden 64: no whole group
    huge = torch.nn.Linear(64, 4)
    with torch.no_grad():
        huge.weight[0, 0] = 1e6  # its group scale would be 125000, past fp16's 65504
    with pytest.raises(ValueError, match="quantize this model to int8"):
        Int4Linear.from_linear(huge)


@pytest.mark.slow
def test_bench_tiny_preset_runs(tmp_path):
    from glmtorch.bench import format_report, run_bench

    report = run_bench(preset="tiny", prefill=64, new_tokens=4, batches=(1, 2), reps=2, out=str(tmp_path / "b.json"))
    assert set(report["results"]) == {"glmtorch", "transformers"}
    assert report["results"]["glmtorch"]["decode_b1_tok_s"] > 0 and report["bandwidth_gb_s"] > 0
    assert os.path.isfile(tmp_path / "b.png")
    # ratios pair each repetition's measurements (taken minutes apart at most), then take the median
    ours, theirs = (report["repetitions"][n]["decode_b1_tok_s"] for n in ("glmtorch", "transformers"))
    assert len(ours) == len(theirs) == 2
    paired = sorted(a / b for a, b in zip(ours, theirs))
    assert report["ratios"]["glmtorch/transformers"]["decode_b1_tok_s"] == pytest.approx(sum(paired) / 2)
    assert report["ratio_ranges"]["glmtorch/transformers"]["decode_b1_tok_s"] == pytest.approx(paired)
    assert "roofline" in format_report(report) and "x (" in format_report(report)
    assert report["gpu"] is None and "GPU:" not in format_report(report)  # a GPU run names its GPU
    # the kernels a figure ran with: their build and target (a portable build's figures must say so)
    assert report["kernels"] == {"build": kernels.build_name(), "march": kernels.target_arch()}
    assert f"kernels: -march={kernels.target_arch()}" in format_report(report)
    assert "kernels: none (library paths)" in format_report({**report, "kernels": {"build": "none", "march": None}})
    assert "GPU: NVIDIA H200\n" in format_report({**report, "gpu": "NVIDIA H200"})


@pytest.mark.slow
def test_bench_measures_constrained_and_speculative_decoding():
    """--json-schema adds a constrained glmtorch row (with a GLM-sized tokenizer for a preset), --speculate the
    speculation figures; --arch glm4 benches GLM-4-0414's layer."""
    from glmtorch.bench import BENCH_SCHEMA, format_report, run_bench

    report = run_bench(preset="tiny", prefill=16, new_tokens=4, batches=(1,), reps=1, with_transformers=False,
                       json_schema=BENCH_SCHEMA, speculate=2, arch="glm4")
    assert report["results"]["glmtorch json-schema"]["decode_b1_tok_s"] > 0 and "(glm4)" in report["model"]
    assert set(report["speculation"]) == {"num_speculative_tokens", "repetitive", "free"}
    assert report["speculation"]["free"]["tokens_per_pass"] >= 1
    assert "speculation (repetitive, batch 1)" in format_report(report)


@torch.no_grad()
def test_int8_decode_when_inputs_are_not_whole_blocks(tmp_path):
    # hidden 48: the int8 kernel works in blocks of 32 inputs, so these layers take the library path
    model = glmtorch.GlmForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS["six_heads_gelu"]), tmp_path),
                                                    quantize="int8")
    exact = glmtorch.GlmForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=[])
    assert out.shape == (1, 7)
    assert rel_err(model(out).logits, exact(out).logits) < 2e-2


@torch.no_grad()
def test_fused_step_says_why_it_does_not_cover_a_model(tmp_path):
    from glmtorch.fastpath import FUSED_STEP_FEATURES, describe_decode_step, fused_step_support

    path = save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path / "gqa")
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    assert fused_step_support(model) == (True, "") and describe_decode_step(model).startswith("fused C++ step")
    assert fused_step_support(model.to(torch.float16)) == (False, FUSED_STEP_FEATURES[3])
    gelu = glmtorch.GlmForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS["six_heads_gelu"]), tmp_path / "g"))
    assert fused_step_support(gelu) == (False, "SiLU MLP")
    assert "not fused, needs SiLU MLP" in describe_decode_step(gelu)
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    model.model.layers[0].post_self_attn_layernorm = torch.nn.Identity()  # a layer the C++ step does not know
    assert fused_step_support(model) == (False, FUSED_STEP_FEATURES[6])


@torch.no_grad()
def test_fused_step_is_timed_as_a_whole_where_matrices_disagree(pair, monkeypatch, tmp_path):
    """Where some products would rather take the library, the fused step is kept if the whole step is faster
    fused (measured on a scratch cache, once per machine: the choice is kept in the dispatch table), and dropped
    if not; the real cache is untouched by the timing."""
    from glmtorch import dispatch

    _, path = pair
    monkeypatch.setenv("GLMTORCH_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    monkeypatch.setattr(dispatch, "choose", lambda kind, n, k, rows, paths, dtype: "library")
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    for fused_faster in (True, False):
        dispatch.forget()
        (tmp_path / "dispatch.json").unlink(missing_ok=True)
        calls = []
        step = FusedDecodeStep(lambda *args: calls.append(1) or decode_step(*args))
        monkeypatch.setattr(FusedDecodeStep, "_fused_step_is_faster", lambda self, m, rows: fused_faster)
        cache, positions, full_mask = _prefilled(model, ids, mask)
        before = cache.key_buffer.clone()
        out = step(model, torch.tensor([[3], [4]]), positions[:, 3:], torch.tensor([3]), full_mask, cache)
        assert (calls == []) == fused_faster and out.shape == (2, model.config.vocab_size)
        assert torch.equal(cache.key_buffer[:, :, :, :3], before[:, :, :, :3])
        kept = [v for k, v in json.loads((tmp_path / "dispatch.json").read_text())["choices"].items()
                if k.startswith("fused-step")]
        assert kept == ["kernel" if fused_faster else "library"]
    monkeypatch.undo()
    dispatch.forget()
    step = FusedDecodeStep(decode_step)
    step(model, torch.tensor([[3], [4]]), positions[:, 3:], torch.tensor([3]), full_mask, _prefilled(model, ids, mask)[0])
    assert isinstance(step._fused_step_is_faster(model, 2), bool)  # the real timing runs on a scratch cache


def _packs(dtype):
    from glmtorch.fastpath import packing_supported

    return packing_supported(dtype)


def packable(*dtypes):
    """The dtypes whose weights oneDNN packs on this CPU, as pytest params; the others skipped (torch refuses bf16
    on CPUs without AVX512-BF16-class support)."""
    return [pytest.param(d, marks=pytest.mark.skipif(not _packs(getattr(torch, d)),
                                                      reason=f"oneDNN cannot pack {d} weights on this CPU"))
            for d in dtypes]


def with_library_logits(tmp_path, monkeypatch, config: str, dtype: str):
    """(model, ids, its plain state dict, its logits) for a model of CONFIGS[config] in `dtype`, the logits by the
    library product on plain weights (GLMTORCH_LINEAR_PATH=library stays set)."""
    path = save_hf(make_hf_model(**CONFIGS[config]), tmp_path / "ref")
    model = glmtorch.GlmForCausalLM.from_pretrained(path, dtype=dtype)
    ids = torch.randint(1, 160, (3, 9), generator=torch.Generator().manual_seed(2))
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "library")
    return model, ids, plain_state, model(ids).logits


@pytest.mark.parametrize("dtype", packable("bfloat16", "float32"))
@pytest.mark.parametrize("config", ["gqa", "tied_narrow_heads"])
@torch.no_grad()
def test_packed_weights_give_the_library_product_bit_for_bit(tmp_path, monkeypatch, config, dtype):
    """GLMTORCH_PACK=1: every unshared linear of a bf16 model holds one packed (oneDNN) weight; logits equal the
    plain library path exactly, the state dict and a saved checkpoint hold the plain matrices, and `.to()` and
    unpack_weights bring the plain weights back."""
    from glmtorch.fastpath import pack_weights, unpack_weights

    model, ids, plain_state, expected = with_library_logits(tmp_path, monkeypatch, config, dtype)
    monkeypatch.setenv("GLMTORCH_PACK", "1")
    linears = [m for m in model.modules() if isinstance(m, GemvLinear)]
    assert pack_weights(model, rows=8) == len(linears) - (config == "tied_narrow_heads")
    assert model.lm_head.packed is (config != "tied_narrow_heads")  # a tied head stays the embedding's matrix
    assert model.model.layers[0].mlp.gate_up_proj.packed
    assert torch.equal(model(ids).logits, expected)
    monkeypatch.delenv("GLMTORCH_LINEAR_PATH")  # unforced, the bias is added inside oneDNN's product: rounds once
    assert rel_err(model(ids).logits, expected) < 2e-2
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "library")
    state = model.state_dict()
    assert not any(v.is_mkldnn for v in state.values())
    assert all(torch.equal(state[k], plain_state[k]) for k in plain_state)
    model.save_pretrained(tmp_path / "saved")
    again = glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "saved", dtype=dtype)
    assert torch.equal(again(ids).logits, expected)
    with pytest.raises(RuntimeError, match="unpack_weights"):  # a product that needs the plain weight says so
        with torch.enable_grad():
            model.model.layers[0].mlp.down_proj(torch.zeros(1, 96, dtype=getattr(torch, dtype), requires_grad=True))
    unpack_weights(model)
    assert not any(m.packed for m in linears)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(ids).logits, expected)
    pack_weights(model, rows=8)
    wide = model.to(torch.float32)  # .to() unpacks first
    assert not any(m.packed for m in linears) and wide.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", packable("float32", "bfloat16"))
@torch.no_grad()
def test_a_step_whose_head_runs_outside_gives_its_greedy_tokens(tmp_path, monkeypatch, dtype):
    """With the LM head's weight packed for oneDNN, the fused step stops at the final norm and the head runs after
    it, in Python: each row's greedy token is then found there, the argmax of the logits returned."""
    model = glmtorch.GlmForCausalLM.from_pretrained(save_hf(make_hf_model(**CONFIGS["gqa"]), tmp_path), dtype=dtype)
    model.lm_head.pack()  # the head alone: packed layers are not the plan's
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")  # the fused step taken, not timed against the layers
    step = compiled_decode_step(model)
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    cache, positions, full_mask = _prefilled(model, ids, mask)
    greedy = torch.full((2,), -1)
    logits = step(model, torch.tensor([[3], [4]]), positions[:, 3:], torch.tensor([3]), full_mask, cache,
                  greedy=greedy)
    assert step.plan is not None and step.head_outside
    assert torch.equal(greedy, logits.float().argmax(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("config", ["gqa", "tied_narrow_heads"])
@torch.no_grad()
def test_weights_in_blocks_give_the_library_product(tmp_path, monkeypatch, config, dtype):
    """GLMTORCH_PACK=blocks: every unshared linear holds its weight in the kernels' blocks of 16 rows; a prefill
    (layer by layer) and the fused decode step give the library's logits (fp32 < 1e-5, bf16 within its rounding)
    and the same greedy tokens; the state dict and a saved checkpoint hold the plain matrices; unpack_weights and
    `.to()` bring them back, and a product that needs gradients says what to do."""
    if not kernels.takes_blocks(getattr(torch, dtype), 16, 16):
        pytest.skip(f"the kernels here do not take {dtype} blocks (fp32: AVX2 or AVX-512; bf16: AVX512-BF16)")
    from glmtorch.fastpath import pack_weights, unpack_weights

    model, ids, plain_state, expected = with_library_logits(tmp_path, monkeypatch, config, dtype)
    expected_tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    monkeypatch.delenv("GLMTORCH_LINEAR_PATH")
    monkeypatch.setenv("GLMTORCH_PACK", "blocks")
    linears = [m for m in model.modules() if isinstance(m, GemvLinear)]
    assert pack_weights(model, rows=8) == len(linears) - (config == "tied_narrow_heads")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dim() == 3
    assert model.lm_head.layout == ("plain" if config == "tied_narrow_heads" else "blocks")  # a tied head stays
    assert rel_err(model(ids).logits, expected) < (1e-5 if dtype == "float32" else 2e-2)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), expected_tokens)
    state = model.state_dict()
    assert all(v.dim() == plain_state[k].dim() and torch.equal(v, plain_state[k]) for k, v in state.items())
    model.save_pretrained(tmp_path / "saved")
    again = glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "saved", dtype=dtype)
    assert all(torch.equal(v, plain_state[k]) for k, v in again.state_dict().items())
    with pytest.raises(RuntimeError, match="unpack_weights"):
        with torch.enable_grad():
            model.model.layers[0].mlp.down_proj(torch.zeros(1, 96, dtype=getattr(torch, dtype), requires_grad=True))
    unpack_weights(model)
    assert all(m.layout == "plain" for m in linears) and all(p.requires_grad for p in model.parameters())
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "library")
    assert torch.equal(model(ids).logits, expected)
    pack_weights(model, rows=8)
    wide = model.to(torch.float32)  # .to() unpacks first
    assert all(m.layout == "plain" for m in linears) and wide.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", packable("bfloat16"))
@torch.no_grad()
def test_packing_is_decided_by_timing_the_step_once(pair, monkeypatch, dtype):
    """Unforced, pack_weights times the decode step each way (at one row, between, at the batch) and keeps the chosen
    layout in the dispatch table, which the next call reads instead of timing again; GLMTORCH_PACK=0 unpacks."""
    from glmtorch import dispatch, fastpath

    _, path = pair
    monkeypatch.setenv("GLMTORCH_FUSED_STEP", "0")  # a bf16 step would time itself too (fused or not): not counted here
    model = glmtorch.GlmForCausalLM.from_pretrained(path, dtype=dtype)
    timed = []
    real = fastpath.time_decode_step
    monkeypatch.setattr(fastpath, "time_decode_step", lambda *a, **k: timed.append(a[1]) or real(*a, **k))
    linears = [m for m in model.modules() if isinstance(m, GemvLinear)]
    blocks = any(kernels.takes_blocks(m.weight.dtype, m.out_features, m.in_features) for m in linears)
    packed = fastpath.pack_weights(model, rows=5)
    # plain, the LM head packed, all packed (and all in blocks where the kernels take them), in turn, LAYOUT_ROUNDS
    # times: at one row, between, at the row bucket
    layouts = 3 + blocks
    assert timed == [1, 4, 8] * layouts * fastpath.LAYOUT_ROUNDS
    choice = [v for k, v in dispatch.decisions().items() if k.startswith("layout") and k.endswith("at 1,4,8 rows<=8")]
    named = {0: "plain", 1: "packed_head"}.get(packed, "packed")
    assert choice == ["blocks" if model.lm_head.layout == "blocks" else named]
    assert (model.lm_head.layout != "plain") is (packed > 0)
    assert fastpath.pack_weights(model, rows=7) == packed and timed == [1, 4, 8] * layouts * fastpath.LAYOUT_ROUNDS
    monkeypatch.setenv("GLMTORCH_PACK", "1")
    assert fastpath.pack_weights(model, rows=5) > 0 and model.lm_head.layout == "onednn"
    if blocks:
        monkeypatch.setenv("GLMTORCH_PACK", "blocks")
        assert fastpath.pack_weights(model, rows=5) == len(linears)
        assert all(m.layout == "blocks" for m in linears)
    monkeypatch.setenv("GLMTORCH_PACK", "0")
    assert fastpath.pack_weights(model, rows=5) == 0
    assert all(m.layout == "plain" for m in linears)
    monkeypatch.setenv("GLMTORCH_PACK", "blcoks")  # a wrong value is refused, not taken for "measure"
    with pytest.raises(ValueError, match="GLMTORCH_PACK='blcoks': expected 0"):
        fastpath.pack_weights(model, rows=5)
    with pytest.raises(ValueError, match="expected 'onednn' or 'blocks'"):
        model.lm_head.pack("pairs")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@torch.no_grad()
def test_fused_norm_and_mlp_match_the_reference(tmp_path, monkeypatch, config):
    """The C++ RMSNorm, rotary embedding and SiLU-times-up (forced: GLMTORCH_LINEAR_PATH=kernel) keep fp32 parity
    with transformers on every odd config (widths that are no multiple of the vector size, partial and full
    rotary, head_dim 8 to 24 included), and bf16 within its rounding of the eager ops."""
    from glmtorch.fastpath import FusedRMSNorm, FusedSiluMLP

    ref = make_hf_model(**CONFIGS[config])
    path = save_hf(ref, tmp_path)
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    assert isinstance(model.model.norm, FusedRMSNorm)
    assert isinstance(model.model.layers[0].mlp, FusedSiluMLP) is (model.config.hidden_act == "silu")
    ids = torch.randint(1, 160, (3, 11), generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")
    with torch.profiler.profile() as run:
        logits = model(ids).logits
    ran = {event.name for event in run.events()}
    assert "glmtorch_kernels::rms_norm" in ran and "glmtorch_kernels::rotary" in ran
    assert ("glmtorch_kernels::silu_mul" in ran) is (model.config.hidden_act == "silu")
    assert rel_err(logits, ref(ids).logits) < 1e-5
    model.to(torch.bfloat16)
    fused = model(ids).logits
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "library")
    assert rel_err(fused, model(ids).logits) < 2e-2


@pytest.mark.skipif(not _packs(torch.float32), reason="oneDNN cannot pack fp32 weights on this CPU")
@torch.no_grad()
def test_fused_step_with_a_packed_lm_head(pair):
    """An fp32 model whose LM head alone is packed keeps the fused C++ step (one row: always the fused step): it
    stops at the final norm and the packed head runs after it, with the eager step's logits."""
    _, path = pair
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    cache, positions, full_mask = _prefilled(model, ids, mask)
    expected = decode_step(model, torch.tensor([[3]]), positions[:, 3:], torch.tensor([3]), full_mask, cache)
    model.lm_head.pack()
    assert fused_step_supported(model)
    calls = []
    step = FusedDecodeStep(lambda *args: calls.append(1) or decode_step(*args))
    cache, positions, full_mask = _prefilled(model, ids, mask)
    out = step(model, torch.tensor([[3]]), positions[:, 3:], torch.tensor([3]), full_mask, cache)
    assert calls == [] and step.plan is not None
    assert rel_err(out, expected) < 1e-5


@torch.no_grad()
def test_packing_is_skipped_where_onednn_refuses_the_dtype(pair, monkeypatch):
    """On a CPU where torch's oneDNN refuses bf16 (no AVX512-BF16-class support), pack_weights leaves the model
    as it is instead of failing: even forced, nothing is packed and the logits do not change."""
    from glmtorch import fastpath

    _, path = pair
    model = glmtorch.GlmForCausalLM.from_pretrained(path, dtype="bfloat16")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    monkeypatch.setitem(fastpath._can_pack, torch.bfloat16, False)
    monkeypatch.setenv("GLMTORCH_PACK", "1")
    assert fastpath.pack_weights(model, rows=8) == 0
    assert not any(getattr(m, "packed", False) for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_layouts_are_timed_at_one_row_between_and_at_the_batch():
    from glmtorch.fastpath import layout_sizes

    assert layout_sizes(1) == [1]
    assert layout_sizes(2) == [1, 2]
    assert layout_sizes(64) == [1, 8, 64]
    assert layout_sizes(256) == [1, 16, 256]
    assert layout_sizes(5) == [1, 4, 8]  # buckets: 5 rows are timed as 8


def test_bench_report_shows_the_layout_decided_at_three_sizes():
    """The report lists the dispatch table's decisions by matrix; a layout timed at three sizes (its key names them)
    is shown with the others, and a key of an unknown shape is skipped, not a crash."""
    from glmtorch.bench import format_report

    report = {"model": "m", "dtype": "bfloat16", "quantize": None, "device": "cpu", "threads": 2, "cpu": {},
              "bandwidth_gb_s": 10.0, "weight_bytes_per_token": 1e6, "roofline_decode_b1_tok_s": 1.0, "results": {},
              "ratios": {}, "reps": 1,
              "linear_paths": {"layout 2 layers [('bfloat16', 8, 8)] at 1,8,64 rows<=64": "packed_head",
                               "bfloat16 8x8 rows<=8": "library", "something else": "kernel"}}
    text = format_report(report)
    assert "weight layout (plain, packed or blocks) [rows<=64: packed_head]" in text and "rows<=8: library" in text
