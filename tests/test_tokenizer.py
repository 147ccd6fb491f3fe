"""GlmTokenizer: tokenizer.json and tiktoken-style tokenizer.model encode alike, and as transformers does."""

import pytest
import torch

from glmtorch import AutoTokenizer, GlmTokenizer, TokenizerError
from glmtorch.tokenizer import GLM4_SPECIAL_TOKENS
from conftest import TOKENIZER_TEXT, build_bpe_tokenizer, write_tiktoken_file

TEXTS = TOKENIZER_TEXT[:6] + ["unseen: zebra quokka 🦘 ñandú 0123456789", "[gMASK]<sop><|user|>\nhi<|assistant|>\nok",
                              "  leading spaces and trailing  ", "\n\n\nnewlines\r\n"]


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("tiktoken")
    write_tiktoken_file(build_bpe_tokenizer(), path / "tokenizer.model")
    return path


def test_tokenizer_json_and_tiktoken_model_encode_identically(tokenizer_dir, tiktoken_dir):
    a = AutoTokenizer.from_pretrained(tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tiktoken_dir)
    assert a.vocab_size == b.vocab_size
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
        assert b.decode(b.encode(text)) == text
    first_special = a.vocab_size - len(GLM4_SPECIAL_TOKENS)
    assert b.convert_tokens_to_ids(list(GLM4_SPECIAL_TOKENS)) == list(range(first_special, a.vocab_size))


def test_matches_transformers_tokenizer(tokenizer_dir):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == ref.eos_token_id and ours.pad_token_id == ref.pad_token_id


def test_batch_left_padding_and_to(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tok(["a much longer sentence here", "short"], return_tensors="pt", padding=True).to("cpu")
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.dtype == torch.long
    n_short = len(tok.encode("short"))
    assert batch.attention_mask[1].tolist() == [0] * (batch.input_ids.shape[1] - n_short) + [1] * n_short
    assert (batch.input_ids[1, : -n_short] == tok.pad_token_id).all()
    right = tok(["a much longer sentence here", "short"], return_tensors="pt", padding=True, padding_side="right")
    assert right.attention_mask[1, 0] == 1 and right.attention_mask[1, -1] == 0
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a much longer sentence here", "short"], return_tensors="pt")


def test_special_tokens_skip_and_ids(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode("[gMASK]<sop><|user|>\nhello")
    assert tok.convert_ids_to_tokens(ids[:3]) == ["[gMASK]", "<sop>", "<|user|>"]
    assert tok.batch_decode([ids], skip_special_tokens=True) == ["\nhello"]
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.stop_token_ids() == set(tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"]))


def test_save_and_reload_keeps_template_and_settings(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, chat_template="{{ messages[0].content }}")
    tok.save_pretrained(tmp_path)
    again = GlmTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == "{{ messages[0].content }}" and again.padding_side == "left"
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_missing_and_broken_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_text("this is not base64 at all\n")
    with pytest.raises(TokenizerError, match="tokenizer.model:1"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="corrupt"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no such directory"):
        AutoTokenizer.from_pretrained(tmp_path / "missing")
