"""generate(): greedy parity with transformers, processors, seeded sampling, stopping, streaming, validation."""

import threading

import pytest
import torch

import glmtorch
from glmtorch import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, stream_text
from glmtorch.generation import processors as P
from glmtorch.generation.config import GenerationConfig, check_logit_bias
from conftest import BASE, CONFIGS, make_hf_model, save_hf

TINY = dict(BASE, **CONFIGS["gqa"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = make_hf_model(**CONFIGS["mqa_wide_heads"])
    path = save_hf(ref, tmp_path_factory.mktemp("gen"))
    return ref, glmtorch.GlmForCausalLM.from_pretrained(path)


def padded_prompts():
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [0, 0, 0, 0, 0, 40, 41]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("eos", [[1, 2, 3], [1, 2, 3, 47, 81, 5]])
def test_greedy_matches_transformers_left_padded_batch(pair, eos):
    ref, ours = pair
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = ref.generate(ids, **kw)
    got = ours.generate(ids, **kw)
    assert torch.equal(got, expected)


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    ref, ours = pair
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=1.3, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("ours,theirs", [
    (P.RepetitionPenalty(1.7), "RepetitionPenaltyLogitsProcessor(1.7)"),
    (P.Temperature(0.6), "TemperatureLogitsWarper(0.6)"),
    (P.TopK(7), "TopKLogitsWarper(7)"),
    (P.TopP(0.8), "TopPLogitsWarper(0.8)"),
    (P.MinP(0.05), "MinPLogitsWarper(0.05)"),
])
def test_processor_matches_transformers(ours, theirs):
    import transformers.generation.logits_process as lp

    ref = eval(theirs, vars(lp))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=g) * 3
    history = torch.randint(0, 200, (4, 12), generator=g)
    assert torch.equal(ours(history, logits.clone()), ref(history, logits.clone()))


def test_openai_penalties_and_logit_bias_follow_their_definitions():
    """presence / frequency penalties (OpenAI's: logit - frequency x count - presence x (count > 0), counted over
    the reply only, as vLLM does) and logit_bias, against a loop over every row and token; padding (-1) counts
    for nothing."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    history = torch.randint(0, 50, (3, 20), generator=g)
    history[1, :6] = -1  # left padding
    prompt = 8
    got = P.PresenceFrequencyPenalty(0.7, -0.3, prompt)(history, logits.clone())
    expected = logits.clone()
    for b in range(3):
        reply = [t for t in history[b, prompt:].tolist() if t >= 0]
        for t in set(reply):
            expected[b, t] -= -0.3 * reply.count(t) + 0.7
    assert torch.allclose(got, expected, atol=1e-6) and not torch.equal(got, logits)
    assert torch.equal(P.PresenceFrequencyPenalty(0.7, 0.5, 20)(history, logits), logits)  # no reply yet
    biased = P.LogitBias({3: 100.0, 7: -100.0, 0: 0.5})(history, logits)
    shift = torch.zeros(50)
    shift[3], shift[7], shift[0] = 100.0, -100.0, 0.5
    assert torch.allclose(biased, logits + shift)


def test_min_tokens_masks_the_stop_tokens_until_the_reply_is_long_enough():
    logits = torch.randn(2, 10)
    hold = P.MinTokens({3, 7, 99}, min_tokens=2, prompt_length=4)  # 99: past this vocabulary, ignored
    held = hold(torch.zeros(2, 5, dtype=torch.long), logits)  # one reply token so far
    assert torch.isinf(held[:, [3, 7]]).all() and torch.equal(held[:, [0, 1, 2, 4]], logits[:, [0, 1, 2, 4]])
    assert torch.equal(hold(torch.zeros(2, 6, dtype=torch.long), logits), logits)  # two: free to stop
    only_stop = torch.full((1, 10), -float("inf"))
    only_stop[0, 3] = 1.0  # a constraint that allows only the end: it is not masked away
    assert torch.equal(hold(torch.zeros(1, 4, dtype=torch.long), only_stop), only_stop)


@pytest.mark.parametrize("bias, match", [
    ([1, 2], "must be an object"), ({"abc": 1}, "'abc' is not a token id"), ({"50": 1}, r"not a token id in \[0, 50\)"),
    ({"-1": 1}, "not a token id"), ({"3": 101}, r"must be a number in \[-100, 100\]"), ({"3": "1"}, "must be a number"),
    ({"3": True}, "must be a number"), ({"3": float("nan")}, "must be a number"), ({"\u0663": 1}, "not a token id"),
])
def test_logit_bias_entries_are_checked(bias, match):
    with pytest.raises(ValueError, match=match):
        check_logit_bias(bias, 50)
    assert check_logit_bias({"3": 1, 7: -2.5}, 50) == {3: 1.0, 7: -2.5}


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    _, ours = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    a = ours.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.95, seed=123)
    b = ours.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.95,
                      generator=torch.Generator().manual_seed(123))
    c = ours.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.95, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = ours.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=20, do_sample=True, top_k=1, seed=5), greedy)


def test_all_eos_ids_stop_and_finished_rows_are_padded(pair):
    _, ours = pair
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = ours.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)
    first_new = free[0, 4].item()
    out = ours.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[150, first_new], pad_token_id=0)
    assert out[0, 4] == first_new and (out[0, 5:] == 0).all()


def test_defaults_come_from_generation_config(tmp_path, pair):
    ref, _ = pair
    path = save_hf(ref, tmp_path / "gc")
    GenerationConfig(max_new_tokens=3, eos_token_id=[1, 2, 3], pad_token_id=0).save_pretrained(path)
    model = glmtorch.GlmForCausalLM.from_pretrained(path)
    assert model.generation_config.max_new_tokens == 3
    assert model.generation_config.eos_token_ids == [1, 2, 3]
    assert model.generate(torch.tensor([[5, 6]]), eos_token_id=[]).shape == (1, 5)
    assert model.generate(torch.tensor([[5, 6]]), eos_token_id=[], max_new_tokens=7).shape == (1, 9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(seed=-3), "seed"),
    (dict(bogus=1), "bogus"),
])
def test_invalid_parameters_are_clear_errors(pair, kwargs, match):
    _, ours = pair
    with pytest.raises((ValueError, TypeError), match=match):
        ours.generate(torch.tensor([[5, 6]]), **{"max_new_tokens": 2, **kwargs})


def test_prompt_too_long_and_bad_ids(pair):
    _, ours = pair
    too_long = torch.ones(1, ours.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="at most 256"):
        ours.generate(too_long, max_new_tokens=1)
    with pytest.raises(ValueError, match="out of range"):
        ours.generate(torch.tensor([[5, 999]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="no room"):
        ours.generate(torch.ones(1, 30, dtype=torch.long), max_length=20)


def test_stop_strings_and_streaming(chat_checkpoint):
    _, path = chat_checkpoint
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                     return_tensors="pt")
    full = model.generate(prompt, max_new_tokens=30, eos_token_id=[], do_sample=False)
    text = tok.decode(full[0, prompt.shape[1]:], skip_special_tokens=True)
    assert len(text) > 6
    stop = text[4:6]
    stopped = model.generate(prompt, max_new_tokens=30, eos_token_id=[], stop_strings=[stop], tokenizer=tok)
    stopped_text = tok.decode(stopped[0, prompt.shape[1]:], skip_special_tokens=True)
    assert stop in stopped_text and text.startswith(stopped_text) and len(stopped_text) < len(text) + 1
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(prompt, max_new_tokens=3, stop_strings=["x"])

    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(input_ids=prompt, max_new_tokens=30, eos_token_id=[],
                                                                 streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == text and len(pieces) > 1

    shown = "".join(p for p, _ in stream_text(model, tok, prompt, max_new_tokens=30, eos_token_id=[]))
    assert shown == text
    events = list(stream_text(model, tok, prompt, stop_strings=[stop], max_new_tokens=30, eos_token_id=[]))
    assert "".join(p for p, _ in events) == text[:text.index(stop)] and events[-1] == ("", "stop")


class WindowDecoding:
    """A tokenizer seen without GlmTokenizer.byte_pieces: the streaming detokenizer then decodes windows of tokens,
    as it does for a SentencePiece tokenizer (each test of streaming runs both ways)."""

    def __init__(self, tokenizer) -> None:
        self.decode, self.decode_ids = tokenizer.decode, tokenizer.decode_ids


def streaming_tokenizer(tokenizer_dir, way: str):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok if way == "bytes" else WindowDecoding(tok)


@pytest.mark.parametrize("way", ["bytes", "windows"])
def test_streaming_never_splits_a_character(tokenizer_dir, way):
    from glmtorch.generation.streaming import StreamingDetokenizer

    tok = streaming_tokenizer(tokenizer_dir, way)
    text = "你好，世界！🙂 café"
    detok = StreamingDetokenizer(tok)
    assert (detok.pieces is not None) == (way == "bytes")
    pieces = [detok.add_token(t) for t in AutoTokenizer.from_pretrained(tokenizer_dir).encode(text)]
    pieces.append(detok.finalize())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("think_tags_special", [False, True])
def test_byte_level_streaming_equals_decode_of_all_the_tokens(tokenizer_dir, think_tags_special):
    """The byte path (each token's bytes through an incremental UTF-8 decoder) gives decode() of all the tokens,
    and the window path alike, over random ids of the whole vocabulary (byte tokens that split a character,
    control tokens skipped or kept, ids past the vocabulary) with and without skip_special_tokens; a GLM-Z1
    tokenizer whose thinking tags are special tokens keeps them; an added token in another script is its own
    UTF-8."""
    import random

    from tokenizers import AddedToken

    from glmtorch.generation.streaming import StreamingDetokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if think_tags_special:
        tok.backend.add_special_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    tok.backend.add_tokens([AddedToken("世界🙂", special=False)])  # characters outside the byte-level alphabet
    size = tok.backend.get_vocab_size(with_added_tokens=True)
    rng = random.Random(0)
    text = tok.encode("你好，世界！🙂 café <think>x</think>", add_special_tokens=False)
    for trial in range(200):
        ids = [rng.randrange(size + 3) if rng.random() < 0.8 else rng.choice(text) for _ in range(rng.randint(0, 40))]
        for skip in (True, False):
            expected = tok.decode(ids, skip_special_tokens=skip)
            for way in (tok, WindowDecoding(tok)):
                detok = StreamingDetokenizer(way, skip_special_tokens=skip)
                streamed = "".join(detok.add_token(i) for i in ids) + detok.finalize()
                assert streamed == expected, (ids, skip, type(way).__name__)
                assert (detok.pieces is not None) == (way is tok)
    assert "<think>" in tok.decode(text, skip_special_tokens=True)


@pytest.mark.parametrize("way", ["bytes", "windows"])
@pytest.mark.parametrize("stops", [[], ["o w"], ["界！", "xyz", "\n\n"], ["é"]])
def test_text_stream_equals_the_whole_text_cut_at_the_first_stop(tokenizer_dir, stops, way):
    """Streamed piece by piece (only the unshown text searched), the output is the whole decoded text up to the
    first stop string, with "stop" exactly when one occurs; over random token sequences and every cut point."""
    import random

    from glmtorch.generation.streaming import TextStream

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = tok.encode("Hello world\n\n你好，世界！🙂 café, o wonder: hello o world é", add_special_tokens=False)
    rng = random.Random(0)
    for trial in range(40):
        ids = source[:] if trial == 0 else [rng.choice(source) for _ in range(rng.randint(1, 30))]
        whole = tok.decode(ids)
        hits = [i for i in (whole.find(s) for s in stops) if i >= 0]
        stream, shown, reason = TextStream(tok if way == "bytes" else WindowDecoding(tok), stops), "", None
        for i in ids:
            piece, reason = stream.add(i)
            shown += piece
            if reason:
                break
        if reason is None:
            piece, reason = stream.finish()
            shown += piece
        assert shown == (whole[:min(hits)] if hits else whole), (ids, stops)
        assert (reason == "stop") == bool(hits)


def test_seed_usage_snippet_runs_with_only_the_import_changed(chat_checkpoint):
    _, checkpoint = chat_checkpoint
    from glmtorch import AutoModelForCausalLM, AutoTokenizer, infer_device
    device = infer_device()

    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = "Give me a short introduction to large language model."
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([text], return_tensors="pt").to(model.device)
    generated_ids = model.generate(model_inputs.input_ids, max_new_tokens=512, do_sample=True)
    generated_ids = [output_ids[len(input_ids):] for input_ids, output_ids in zip(model_inputs.input_ids, generated_ids)]
    response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
    assert isinstance(response, str) and device == model.device.type


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True, temperature=1e-300), "temperature"),  # was NaN from softmax
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(do_sample=True, top_p=5e-324), "top_p"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=2**40), "max_new_tokens"),
    (dict(seed=2**64), "seed"),
    (dict(pad_token_id=10**6), "pad_token_id"),
])
def test_decoding_values_outside_their_range_are_named(kwargs, match):
    model = glmtorch.GlmForCausalLM(glmtorch.GlmConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)


@pytest.mark.parametrize("input_ids", [torch.tensor([[1.5, 2.0]]), [[1, 2], [3]], torch.tensor([[True, False]])])
def test_input_ids_that_are_not_integer_ids_are_named(input_ids):
    model = glmtorch.GlmForCausalLM(glmtorch.GlmConfig(**TINY))
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(input_ids, max_new_tokens=2)
    if isinstance(input_ids, torch.Tensor):
        with pytest.raises(ValueError, match="input_ids"):
            model(input_ids)


def test_sampler_names_non_finite_probabilities():
    from glmtorch.generation.sampling import sample_from_logits

    with pytest.raises(ValueError, match="non-finite probabilities"):
        sample_from_logits(torch.full((1, 8), float("nan")))


def test_text_stream_holds_back_stop_prefixes_and_flushes_them_at_eos(tokenizer_dir):
    """Text that might begin a stop string is held back, and given out when the sequence ends another way (the
    server used to drop it at an end-of-sequence token)."""
    from glmtorch.generation.streaming import TextStream

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode("To be, or not to be", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    stream = TextStream(tok, ["be!"], [eos])
    out = [stream.add(i) for i in ids]
    assert all(reason is None for _, reason in out)
    assert "".join(p for p, _ in out) == "To be, or not to "  # the last "be" may begin "be!": held
    assert stream.add(eos) == ("be", "stop")
    stop, shown = TextStream(tok, ["not"], [eos]), ""
    for i in ids:
        piece, reason = stop.add(i)
        shown += piece
        if reason:
            break
    assert (shown, reason) == ("To be, or ", "stop")  # the stop string itself is never shown
    ignored = TextStream(tok, None, [eos], ignore_eos=True)
    assert ignored.add(eos)[1] is None
