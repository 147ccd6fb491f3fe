"""GLM-4-0414 / GLM-Z1 chat formats and reasoning output: the built-in templates, thinking split from the answer
(whole and streamed, in pieces of every size), and the server's reasoning_content, including the cases peers get
wrong: the opening <think> written by the prompt, a reply cut inside its thinking, a tool call after thinking,
enable_thinking=false."""

import json
import random

import pytest

import glmtorch
from glmtorch.chat import (ReasoningStream, default_chat_template, parse_assistant_reply, prompt_opens_thinking,
                           render_chat, split_reasoning)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>greet back</think>\nHello!"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
]


def test_glm4_0414_template():
    text = render_chat(default_chat_template("glm4_0414"), CONVERSATION, add_generation_prompt=True)
    assert text == ('[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think>greet back</think>\nHello!'
                    '<|user|>\nWeather in Paris?<|assistant|>get_weather \n{"city": "Paris"}'
                    '<|observation|>\n{"temp": 21}<|assistant|>')
    with_tools = render_chat(default_chat_template("glm4_0414"), CONVERSATION[1:2], tools=[WEATHER])
    assert with_tools.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n{\n    \"name\": \"get_weather\"")
    assert with_tools.endswith("在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nHi")


def test_glm_z1_template_thinks_and_drops_old_thinking():
    template = default_chat_template("glmz1")
    text = render_chat(template, CONVERSATION, add_generation_prompt=True)
    assert "<|assistant|>\nHello!<|user|>" in text and "greet back" not in text  # earlier thinking left out
    assert text.endswith('<|observation|>\n{"temp": 21}<|assistant|>\n<think>') and prompt_opens_thinking(text)
    off = render_chat(template, CONVERSATION[1:2], add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|assistant|>\n<think></think>") and not prompt_opens_thinking(off)


def test_glm4_checkpoint_without_a_template_gets_the_0414_one(tmp_path, tokenizer_dir):
    import shutil

    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    for name in ("chat_template.jinja",):
        (tmp_path / "tok" / name).unlink(missing_ok=True)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "glm4"}))
    assert glmtorch.AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template == default_chat_template("glm4_0414")
    (tmp_path / "tok" / "config.json").write_text("[not json")  # the loader reports that one, not the tokenizer
    assert glmtorch.AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template is None


@pytest.mark.parametrize("text,thinking,reasoning,content", [
    ("Let me see. 2+2=4.\n</think>\n\nThe answer is 4.", True, "Let me see. 2+2=4.", "The answer is 4."),
    ("<think>\nhmm</think>Four.", False, "hmm", "Four."),
    ("  <think>only thinking, cut by the length lim", False, "only thinking, cut by the length lim", ""),
    ("still thinking when cut", True, "still thinking when cut", ""),
    ("\nThe answer is 4.", False, None, "The answer is 4."),  # GLM-4-9B: no thinking at all
    ("</think>Four.", True, "", "Four."),  # empty thinking
])
def test_split_and_parse(text, thinking, reasoning, content):
    assert split_reasoning(text, thinking) == (reasoning, content if reasoning is not None else text)
    reply = parse_assistant_reply(text, thinking=thinking)
    assert reply.reasoning_content == reasoning and reply.content == content and not reply.tool_calls


def test_tool_call_after_thinking():
    reply = parse_assistant_reply('I should look it up.</think>\nget_weather\n{"city": "Paris"}', [WEATHER], True)
    assert reply.reasoning_content == "I should look it up." and reply.tool_calls[0].arguments == {"city": "Paris"}
    reply = parse_assistant_reply("Think.</think>\nget_weather is a function I lack.\nSorry.", [WEATHER], True)
    assert not reply.tool_calls and reply.content.startswith("get_weather is a function")  # not JSON: content


REPLIES = [
    ("Let me see.\n\n2+2=4. </think>\n\nThe answer is 4.", True),
    ("<think>x < y and </thi are not tags</think>Done", False),
    ("\n<think>\n</think>\n", False),
    ("<thin", False),  # looks like a tag's start, is text
    ("thinking cut off at </thi", True),
    ("\nplain GLM-4 answer with <think> inside", False),
]


@pytest.mark.parametrize("text,thinking", REPLIES)
def test_streamed_split_equals_whole_split_for_any_pieces(text, thinking):
    expected = split_reasoning(text, thinking)
    rng = random.Random(0)
    cuts_list = [list(range(1, len(text))), []] + [sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) - 1)))
                                                  for _ in range(30)]
    for cuts in cuts_list:
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        stream, thought, answer = ReasoningStream(thinking), "", ""
        for piece in pieces:
            t, a = stream.feed(piece)
            thought, answer = thought + t, answer + a
        t, a = stream.finish()
        thought, answer = thought + t, answer + a
        if expected[0] is None:
            assert (stream.thought, thought, answer) == (False, "", text), pieces
        else:
            assert (thought, answer) == expected, pieces


def test_decode_keeps_think_tags_that_are_special_tokens(tokenizer_dir):
    from tokenizers import AddedToken

    tokenizer = glmtorch.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.backend.add_special_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    ids = tokenizer.encode("<think>a</think><|user|>b", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>b"
    assert tokenizer.decode(ids) == "<think>a</think><|user|>b"


# -- the server ------------------------------------------------------------------------------------------------
@pytest.fixture
def z1_server(tokenizer_dir):
    from test_serve import RunningServer, ScriptedEngine

    from glmtorch.serve.app import create_app

    tokenizer = glmtorch.GlmTokenizer.from_pretrained(tokenizer_dir, chat_template=default_chat_template("glmz1"))
    engine = ScriptedEngine("")
    server = RunningServer(create_app(engine, tokenizer, "z1"))
    yield server, engine, tokenizer
    server.close()


def _ask(server, stream, **body):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    body = {"model": "z1", "messages": [{"role": "user", "content": "2+2?"}], **body}
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        message = choice.message
        return getattr(message, "reasoning_content", None), message.content, message.tool_calls, choice.finish_reason
    reasoning, content, calls, finish = None, None, [], None
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            delta = choice.delta
            piece = getattr(delta, "reasoning_content", None)
            if piece:
                reasoning = (reasoning or "") + piece
            if delta.content:
                content = (content or "") + delta.content
            calls += delta.tool_calls or []
            finish = choice.finish_reason or finish
    return reasoning, content or "", calls or None, finish


@pytest.mark.parametrize("stream", [False, True])
def test_server_returns_reasoning_content(z1_server, stream):
    server, engine, tokenizer = z1_server
    engine.reply = "2 and 2 make 4.\n</think>\n\nThe answer is 4."
    assert _ask(server, stream) == ("2 and 2 make 4.", "The answer is 4.", None, "stop")
    assert tokenizer.decode(engine.requests[-1].prompt_ids).endswith("<|assistant|>\n<think>")

    engine.reply, engine.finish = "I need to think about thi", "length"  # cut inside the thinking
    assert _ask(server, stream) == ("I need to think about thi", "", None, "length")

    engine.reply, engine.finish = 'Look it up.</think>\nget_weather\n{"city": "Paris"}', "stop"
    reasoning, content, calls, finish = _ask(server, stream, tools=[WEATHER])
    assert reasoning == "Look it up." and finish == "tool_calls" and not content
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}

    engine.reply = "\nFour."  # enable_thinking=false: the template closes the thinking, the reply is all answer
    assert _ask(server, stream, extra_body={"chat_template_kwargs": {"enable_thinking": False}}) == \
        (None, "Four.", None, "stop")
    assert tokenizer.decode(engine.requests[-1].prompt_ids).endswith("<think></think>")


@pytest.mark.parametrize("kwargs", [{"messages": 1}, {"add_generation_prompt": False}, {"not an identifier": 1}, []])
def test_chat_template_kwargs_cannot_replace_what_the_server_sets(z1_server, kwargs):
    import httpx

    server, _, _ = z1_server
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_cli_prints_thinking_apart(tmp_path, chat_checkpoint, capsys, monkeypatch):
    """`glmtorch generate` on a Z1-style template: the thinking is marked off (dimmed on a terminal) or hidden."""
    import io

    from glmtorch import cli

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.GlmTokenizer.from_pretrained(path, chat_template=default_chat_template("glmz1"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt")
    script = iter(["Let me", " think.</th", "ink>\nHi", " there"])
    monkeypatch.setattr("glmtorch.generation.streaming.stream_text",
                        lambda *a, **k: ((piece, None) for piece in script))
    out = io.StringIO()
    text = cli.stream_reply(model, tokenizer, ids, {}, out=out)
    assert text == "Let me think.</think>\nHi there"
    assert out.getvalue() == "<think>\nLet me think.\n</think>\n\nHi there\n"
    script = iter(["Let me", " think.</think>", "\nHi"])
    out = io.StringIO()
    cli.stream_reply(model, tokenizer, ids, {}, out=out, thinking="hide")
    assert out.getvalue() == "Hi\n"
