"""The demo model shipped in the package: it loads, answers a fixed prompt the same way every time, and its
held-out loss on a slice of Tiny Shakespeare stays where the README says."""

import json
import os
import subprocess
import sys

import pytest

import glmtorch
from glmtorch.train import evaluate, tokenize_rows

HERE = os.path.dirname(__file__)
SUMMARY = os.path.join(glmtorch.DEMO_MODEL, "training_summary.json")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(glmtorch.DEMO_MODEL, "config.json")),
                                reason="the demo model has not been trained into this tree")

GOLDEN_PROMPT = "Good morrow, friend. What news from the court?"


@pytest.fixture(scope="module")
def demo():
    model = glmtorch.AutoModelForCausalLM.from_pretrained(glmtorch.DEMO_MODEL, dtype="float32")
    return model, glmtorch.AutoTokenizer.from_pretrained(glmtorch.DEMO_MODEL)


def test_demo_model_files_and_size():
    files = set(os.listdir(glmtorch.DEMO_MODEL))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= files
    assert os.path.getsize(os.path.join(glmtorch.DEMO_MODEL, "model.safetensors")) <= 20e6
    config = json.load(open(os.path.join(glmtorch.DEMO_MODEL, "config.json")))
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    gen = json.load(open(os.path.join(glmtorch.DEMO_MODEL, "generation_config.json")))
    assert len(gen["eos_token_id"]) == 3  # <|endoftext|>, <|user|>, <|observation|>


def test_greedy_reply_is_stable(demo):
    model, tok = demo
    ids = tok.apply_chat_template([{"role": "user", "content": GOLDEN_PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt")
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with open(os.path.join(HERE, "golden_demo_reply.txt"), encoding="utf-8") as f:
        assert reply == f.read()
    assert len(set(reply.split())) >= 4  # words, not noise


def test_held_out_loss_matches_readme(demo):
    model, tok = demo
    sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
    from make_shakespeare_chat import conversations, speeches

    text = open(os.path.join(HERE, "..", "data", "tinyshakespeare.txt"), encoding="utf-8").read()
    cut = text.rfind("\n\n", 0, int(len(text) * 0.9)) + 2
    rows = [(i, row) for i, row in enumerate(conversations(speeches(text[cut:]))[:40])]
    data = tokenize_rows(rows, tok).windows(256)
    metrics = evaluate(model, data, batch_size=8)
    reported = json.load(open(SUMMARY))["final_val_nats_per_char"]
    assert metrics["nats_per_char"] < reported + 0.1 and metrics["nats_per_char"] < 1.7


def test_chat_command_uses_the_demo_model():
    exe = os.path.join(os.path.dirname(sys.executable), "glmtorch")
    result = subprocess.run([exe, "chat", "--max-new-tokens", "16", "--seed", "0"], input="Good morrow, friend.\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "using the built-in demo model" in result.stderr and result.stdout.strip()
