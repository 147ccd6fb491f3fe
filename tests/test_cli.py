"""The installed `glmtorch` command, run in a subprocess."""

import os
import shutil
import subprocess
import sys

import pytest

EXE = shutil.which("glmtorch") or os.path.join(os.path.dirname(sys.executable), "glmtorch")


def run(*args, stdin=None, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_is_fast_and_lists_commands():
    result = run("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "chat" in result.stdout


def test_generate_streams_a_reply(chat_checkpoint):
    _, path = chat_checkpoint
    result = run("generate", str(path), "--prompt", "Hello", "--max-new-tokens", "8", "--greedy", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    raw = run("generate", str(path), "--prompt", "Hello", "--raw", "--max-new-tokens", "5", "--seed", "1",
              "--temperature", "0.7")
    assert raw.returncode == 0, raw.stderr


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_a_compiling_model_says_the_first_reply_waits(chat_checkpoint, monkeypatch, capsys, compiled):
    """A GPU compiles the decode step on the first reply (tens of seconds): the CLI says so, or it looks hung."""
    import argparse

    from glmtorch.cli import load

    monkeypatch.setenv("GLMTORCH_COMPILE", compiled)  # what a GPU with a model of 50 MB or more decides
    _, path = chat_checkpoint
    load(argparse.Namespace(model=str(path), dtype=None, device="cpu", speculate=None))
    assert ("the first reply compiles the decode step" in capsys.readouterr().err) == (compiled == "1")


def test_chat_reads_piped_stdin_and_keeps_history(chat_checkpoint):
    _, path = chat_checkpoint
    result = run("chat", str(path), "--max-new-tokens", "6", "--greedy", stdin="Hello\n/reset\nHello\nMore\n/exit\nignored\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) >= 3 and "(conversation cleared)" in result.stderr
    assert replies[0] == replies[1]  # same first message after /reset gives the same greedy reply


@pytest.mark.parametrize("target", ["/definitely/not/here", "THUDM/glm-4-9b-chat-hf"])
def test_bad_model_path_is_one_line_and_exit_2(target):
    result = run("generate", target, "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("glmtorch: error:")
    assert "Traceback" not in result.stderr


def test_broken_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run("chat", str(tmp_path), stdin="hi\n")
    assert result.returncode == 2 and "not valid JSON" in result.stderr and result.stderr.count("\n") == 1


def test_chat_survives_bytes_that_are_not_utf8():
    result = subprocess.run([EXE, "chat", "--max-new-tokens", "3", "--greedy"], input="caf\xe9 au lait\n".encode("latin-1"),
                            capture_output=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr and result.stdout.strip()


@pytest.mark.parametrize("args, flag", [
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs/--max-batch"),  # was a hang at warm-up
    (["serve", "--max-batch", "-3"], "--max-num-seqs/--max-batch"),  # the old name is an alias
    (["serve", "--max-num-seqs", "100000000"], "--max-num-seqs/--max-batch"),
    (["serve", "--kv-cache-memory", "lots"], "--kv-cache-memory"),
    (["serve", "--max-context", "-1"], "--max-context"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--max-request-body-size", "1"], "--max-request-body-size"),
    (["generate", "--prompt", "hi", "--temperature", "1e-300"], "--temperature"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "hi", "--seed", "-5"], "--seed"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench-serve", "http://x", "--concurrency", "0"], "--concurrency"),
    (["bench-serve", "http://x", "--batching-gain", "-1"], "--batching-gain"),
])
def test_out_of_range_flags_are_usage_errors(args, flag):
    result = run(*args, timeout=60)
    assert result.returncode == 2 and f"argument {flag}:" in result.stderr and "Traceback" not in result.stderr


def test_a_taken_port_is_one_line_before_loading():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("serve", "--port", str(taken.getsockname()[1]), timeout=60)
    assert result.returncode == 2 and "address already in use" in result.stderr
    assert result.stderr.count("\n") == 1 and "warming up" not in result.stderr


def test_glm_z1_checkpoint_generates_with_its_thinking_marked(tmp_path, tokenizer_dir):
    """A glm4 checkpoint with GLM-Z1's template: `generate` loads the Glm4 class, the reply starts inside the
    thinking, printed between <think> tags off a terminal, hidden with --thinking hide; --thinking off closes it."""
    import json

    from conftest import CONFIGS, make_hf_model, save_hf

    import glmtorch
    from glmtorch.chat import default_chat_template

    tok = glmtorch.GlmTokenizer.from_pretrained(tokenizer_dir, chat_template=default_chat_template("glmz1"))
    model = make_hf_model("Glm4ForCausalLM", **{**CONFIGS["gqa"], "vocab_size": tok.vocab_size, "eos_token_id": [],
                                                "pad_token_id": 0})
    path = save_hf(model, tmp_path / "z1")
    tok.save_pretrained(path)
    assert json.loads((tmp_path / "z1" / "config.json").read_text())["model_type"] == "glm4"
    shown = run("generate", path, "--prompt", "Hello", "--max-new-tokens", "6", "--greedy")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("<think>\n")  # six random tokens: cut inside the thinking, or past it
    hidden = run("generate", path, "--prompt", "Hello", "--max-new-tokens", "6", "--greedy", "--thinking", "hide")
    assert hidden.returncode == 0 and "<think>" not in hidden.stdout and \
        shown.stdout.rstrip().endswith(hidden.stdout.rstrip())
    off = run("generate", path, "--prompt", "Hello", "--max-new-tokens", "6", "--greedy", "--thinking", "off")
    assert off.returncode == 0 and not off.stdout.startswith("<think>")


def test_speculation_flags_leave_the_reply_unchanged(chat_checkpoint):
    _, path = chat_checkpoint
    base = ["generate", str(path), "--prompt", "Hello", "--greedy", "--max-new-tokens", "10", "--dtype", "float32"]
    plain = run(*base)
    assert plain.returncode == 0, plain.stderr
    for how in ("ngram", "int4"):
        fast = run(*base, "--speculate", how, "--num-speculative-tokens", "3")
        assert fast.returncode == 0 and fast.stdout == plain.stdout, (how, fast.stderr)
    bad = run(*base, "--speculate", "/no/such/draft")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_without_a_compiler_the_command_says_so_in_one_line_and_still_answers(tmp_path):
    """A fresh machine without g++ (a slim container): the kernels cannot be built; the command prints one
    warning line in its own format (not torch's page-wide banner about the compiler, not Python's file-and-line
    form) and gives the reply it gives with the kernels."""
    command = [EXE, "generate", "--prompt", "Good morrow", "--max-new-tokens", "12", "--greedy"]
    with_kernels = subprocess.run(command, capture_output=True, text=True, timeout=300)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    without = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert with_kernels.returncode == 0 and without.returncode == 0, without.stderr
    warned = [line for line in without.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith("glmtorch: warning: ") and "C++ compiler" in warned[0], \
        without.stderr
    assert "Traceback" not in without.stderr and "!!" not in without.stderr
    assert "warning" not in with_kernels.stderr.lower()
    assert without.stdout == with_kernels.stdout and without.stdout.strip()
