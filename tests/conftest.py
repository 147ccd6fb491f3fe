"""Shared fixtures: tiny random GLM checkpoints written by transformers (the reference) and by glmtorch."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "GLMTORCH_DISPATCH_CACHE" not in os.environ:  # the tests' shapes stay out of the user's table
    _dispatch_folder = tempfile.mkdtemp(prefix="glmtorch-dispatch-")
    atexit.register(shutil.rmtree, _dispatch_folder, ignore_errors=True)  # one left in /tmp by every run otherwise
    os.environ["GLMTORCH_DISPATCH_CACHE"] = os.path.join(_dispatch_folder, "dispatch.json")
os.environ.setdefault("GLMTORCH_COMPILE", "0")  # compiled decoding is tested where asked (test_fastpath.py)
torch.set_num_threads(int(os.environ.get("GLMTORCH_TEST_THREADS") or 0) or min(2, os.cpu_count() or 1))

# Configs that differ where GLM implementations go wrong: kv grouping, rotary fraction, head size,
# biases, tied embeddings, activation.
CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5),
    "mqa_wide_heads": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, partial_rotary_factor=0.25),
    "mha_full_rotary_nobias": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                   partial_rotary_factor=1.0, attention_bias=False),
    "tied_narrow_heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    "six_heads_gelu": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                           hidden_act="gelu", rope_theta=500000.0),
}
BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
            pad_token_id=0, eos_token_id=[1, 2, 3], bos_token_id=None)


def hf_config(config_class: str = "GlmConfig", **changes):
    import transformers

    kw = {**BASE, **changes}
    return getattr(transformers, config_class)(**kw)


def make_hf_model(cls_name: str = "GlmForCausalLM", seed: int = 0, **changes):
    """A random transformers GLM model (a Glm4* class name: GLM-4-0414's) whose biases and norms are not
    trivially zero/one."""
    import transformers

    torch.manual_seed(seed)
    config_class = "Glm4Config" if cls_name.startswith("Glm4") else "GlmConfig"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(hf_config(config_class, **changes))
    with torch.no_grad():  # reference init sets biases to 0 and norms to 1: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(model, path, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kw)
    return str(path)


def padded_batch(vocab=160, lengths=(9, 6, 3), pad=0, seed=1, side="left"):
    """(ids, mask) of random rows of these lengths, padded with `pad` on the left (or right)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad)
    for row, n in enumerate(lengths):
        ids[row, T - n:] = torch.randint(4, vocab, (n,), generator=g)
    if side == "right":
        ids = torch.stack([torch.cat([r[r != pad], r[r == pad]]) for r in ids])
    return ids, (ids != pad).long()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


@pytest.fixture
def hf_checkpoint(tmp_path, config_name):
    """(transformers model, checkpoint directory) for each config."""
    model = make_hf_model(**CONFIGS[config_name])
    return model, save_hf(model, tmp_path / config_name)


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory):
    model = make_hf_model(**CONFIGS["gqa"])
    return model, save_hf(model, tmp_path_factory.mktemp("gqa"))


# -- tokenizers ---------------------------------------------------------------------------------------------
TOKENIZER_TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "Hello world! GLM-4 speaks 中文 and English; numbers 12345 and 3.14159 too.",
    "def add(a, b):\n    return a + b\n\n# tabs\tand  spaces   here",
    "Emoji 🙂 and accents: café, naïve, Ünïcödé. 你好，世界！今天天气很好。",
    '{"city": "Paris", "unit": "celsius"} get_weather\n',
] * 4


def build_bpe_tokenizer(vocab_size: int = 414):
    """A small byte-level BPE with GLM-4's split pattern and special tokens (ids right after the merges)."""
    from glmtorch.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TOKENIZER_TEXT, vocab_size).backend


def write_tiktoken_file(tok, path) -> None:
    """The same vocabulary as THUDM's tokenizer.model: base64 token bytes and rank per line."""
    import base64

    from glmtorch.tokenizer import _bytes_to_unicode

    char_byte = {c: b for b, c in _bytes_to_unicode().items()}
    specials = set(tok.get_added_tokens_decoder())
    with open(path, "w") as f:
        for token, rank in sorted(tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
            if rank in specials:
                continue
            f.write(f"{base64.b64encode(bytes(char_byte[c] for c in token)).decode()} {rank}\n")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """tokenizer.json + tokenizer_config.json (no chat template: the built-in GLM-4 one applies)."""
    from glmtorch import GlmTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    GlmTokenizer(build_bpe_tokenizer(), chat_template=None).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, tokenizer_dir):
    """A transformers GLM whose vocabulary fits the test tokenizer, saved with it: (hf model, directory)."""
    import shutil

    from glmtorch import GlmTokenizer

    tok = GlmTokenizer.from_pretrained(tokenizer_dir)
    stops = tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    model = make_hf_model(**{**CONFIGS["gqa"], "vocab_size": tok.vocab_size + 2, "eos_token_id": stops,
                             "pad_token_id": stops[0]})
    path = tmp_path_factory.mktemp("chat_ckpt")
    save_hf(model, path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / name, path / name)
    return model, path


@pytest.fixture
def timed_prefill_attention(monkeypatch, tmp_path):
    """A fresh dispatch table, and how prefill passes attend 'timed' by a stand-in: yields (calls, outcome), calls
    the (heads, kv heads, head size, new tokens, slots) of every timing asked for, outcome a dict (new tokens,
    slots) -> "in_place" | "gathered" the test may fill ("in_place" where it says nothing)."""
    from glmtorch import cache, dispatch, kernels

    if not kernels.available():
        pytest.skip("kernels not built")
    monkeypatch.setenv("GLMTORCH_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("GLMTORCH_PREFILL_ATTENTION", raising=False)
    dispatch.forget()
    cache._in_place_wins.cache_clear()
    calls, outcome = [], {}

    def timed(dtype, heads, kv_heads, head_dim, new, length):
        calls.append((heads, kv_heads, head_dim, new, length))
        return outcome.get((new, length), "in_place")

    monkeypatch.setattr(cache, "_time_prefill_attention", timed)
    yield calls, outcome
    dispatch.forget()
    cache._in_place_wins.cache_clear()
