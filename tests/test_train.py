"""Training: the loss goes down, resume is exact, assistant-only masking, bad data, and the shipped demo model."""

import json
import os

import pytest
import torch

import glmtorch
from glmtorch.tokenizer import train_bpe_tokenizer
from glmtorch.train import DataError, TrainConfig, load_checkpoint_state, read_rows, train
from conftest import TOKENIZER_TEXT

CHAT = [
    {"messages": [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "To be, or not to be."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who speaks?"},
                  {"role": "assistant", "content": "The question: whether 'tis nobler."},
                  {"role": "user", "content": "Numbers 12345?"}, {"role": "assistant", "content": "3.14159 too."}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TOKENIZER_TEXT, 414)


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = glmtorch.GlmConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=128)
    return glmtorch.GlmForCausalLM.from_config(config)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_assistant_only_masking_is_exact(tokenizer):
    ids, targets, chars = tokenizer.encode_conversation(CHAT[1]["messages"])
    text = tokenizer.decode([i for i, t in zip(ids, targets) if t])
    assert text == "\nThe question: whether 'tis nobler.<|user|>\n3.14159 too.<|endoftext|>"
    untargeted = tokenizer.decode([i for i, t in zip(ids, targets) if not t])
    assert untargeted == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nWho speaks?<|assistant|>\nNumbers 12345?<|assistant|>"
    from glmtorch.train import tokenize_rows

    stream = tokenize_rows([(1, CHAT[1])], tokenizer)
    assert torch.equal(stream.labels == -100, ~torch.tensor(targets))
    assert int(stream.chars.sum()) == len("\nThe question: whether 'tis nobler.\n3.14159 too.")


def test_training_lowers_the_loss_and_resume_is_exact(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT * 40 + [{"text": t} for t in TOKENIZER_TEXT])
    common = dict(data=data, block_size=32, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=5, eval_windows=8,
                  seed=3, progress=False)
    model = tiny_model(tokenizer)
    state = train(model, tokenizer, TrainConfig(out=str(tmp_path / "full"), max_steps=10, **common))
    val = [h["val_loss"] for h in state.history if "val_loss" in h]
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert val[-1] < val[0] and sum(losses[-3:]) < sum(losses[:3])
    assert os.path.isfile(tmp_path / "full" / "loss_curve.png")

    half = tiny_model(tokenizer)
    train(half, tokenizer, TrainConfig(out=str(tmp_path / "half"), max_steps=10, stop_at=5, **common))
    resumed = glmtorch.GlmForCausalLM.from_pretrained(tmp_path / "half", dtype="float32")
    saved_state, optimizer_state = load_checkpoint_state(str(tmp_path / "half"))
    assert saved_state.step == 5
    final = train(resumed, tokenizer, TrainConfig(out=str(tmp_path / "resumed"), max_steps=10, **common),
                  saved_state, optimizer_state)
    assert [h["loss"] for h in final.history if "loss" in h] == pytest.approx(losses, rel=1e-5)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ('{"text": "ok"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', r"bad\.jsonl:1: .*role 'wizard'"),
    ('{"words": "x"}\n', r"bad\.jsonl:1: expected an object with 'text' or 'messages'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"bad\.jsonl:1: .*needs an assistant turn"),
])
def test_bad_data_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_rows(str(path))


def test_train_command_on_text(tmp_path):
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}))
    (tmp_path / "data.txt").write_text("\n".join(TOKENIZER_TEXT) * 3)
    exe = os.path.join(os.path.dirname(sys.executable), "glmtorch")
    result = subprocess.run([exe, "train", "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "out"),
                             "--config", str(tmp_path / "config.json"), "--vocab-size", "300", "--block-size", "16",
                             "--batch-size", "2", "--max-steps", "3", "--eval-every", "3", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "validation loss" in result.stdout
    model = glmtorch.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = glmtorch.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == tok.vocab_size == 300


def test_out_folder_of_someone_else_is_refused_untouched(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not empty and is not a glmtorch training checkpoint"):
        TrainConfig(data="d.txt", out=str(theirs)).validate()
    assert (theirs / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        TrainConfig(data="d.txt", out=str(tmp_path / "file")).validate()
    TrainConfig(data="d.txt", out=str(tmp_path / "new")).validate()  # new and empty folders are fine
    (tmp_path / "empty").mkdir()
    TrainConfig(data="d.txt", out=str(tmp_path / "empty")).validate()


def test_saving_into_its_own_checkpoint_keeps_other_files(tmp_path, tokenizer):
    """Training data kept inside the checkpoint folder survives every save; files of our own are replaced."""
    out = tmp_path / "ckpt"
    data = out / "data.jsonl"
    common = dict(block_size=16, batch_size=2, eval_every=2, eval_windows=2, warmup_steps=1, val_fraction=0.25,
                  save_every=1)
    out.mkdir()
    write_jsonl(data, [{"text": t} for t in TOKENIZER_TEXT * 4])
    (out / "trainer_state.json").write_text("{}")  # an earlier checkpoint of ours (so --out is accepted)
    (out / "model-00001-of-00002.safetensors").write_text("stale shard of an earlier save")
    (out / "notes.txt").write_text("mine")
    cfg = TrainConfig(out=str(out), max_steps=2, data=str(data), **common)
    cfg.validate()
    train(tiny_model(tokenizer), tokenizer, cfg)
    assert (out / "notes.txt").read_text() == "mine" and data.is_file()
    assert not (out / "model-00001-of-00002.safetensors").exists()  # ours, not written again: removed
    assert glmtorch.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == tokenizer.vocab_size
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
