"""What a new user meets: run README's commands in a venv that has only `torch==2.13.0` and `pip install .`.

Run with that venv's Python (`.ci/run` makes the venv); standard library only, so it needs nothing the base install
lacks. Every command must either work or stop with one line that names the extra to install: never a traceback.

    python scripts/check_fresh_install.py        # exit 0 when every check holds; prints one line per check
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
GLMTORCH = os.path.join(BIN, "glmtorch")
HINT = re.compile(r"^glmtorch: error: .* pip install 'glmtorch\[(\w+)\]'\n$")
failures: list[str] = []


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([GLMTORCH, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def works_or_hints(name: str, result: subprocess.CompletedProcess, extra: str, error: str | None = None) -> None:
    """The command worked (exit 0), or it printed exactly one line naming glmtorch[extra] (or, where the
    command cannot work here at all, the one-line `error` expected) and exited 2. stderr must be only that line:
    no traceback, no warning."""
    if "Traceback" in result.stderr:
        check(name, False, "traceback:\n" + result.stderr[-2000:])
    elif result.returncode == 0:
        check(name, "Warning" not in result.stderr, "works" + (f", but warned: {result.stderr[-500:]!r}"
                                                           if "Warning" in result.stderr else ""))
    else:
        hint = HINT.match(result.stderr)
        one_line = result.stderr.startswith("glmtorch: error:") and result.stderr.count("\n") == 1
        check(name, result.returncode == 2 and ((hint is not None and hint.group(1) == extra)
                                                or (error is not None and one_line and error in result.stderr)),
              f"exit {result.returncode}, stderr {result.stderr.strip()[-500:]!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve() -> None:
    """`glmtorch serve` starts, answers a chat request, and stops on SIGTERM without a traceback."""
    port = free_port()
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([GLMTORCH, "serve", "--port", str(port), "--max-num-seqs", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    reply = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and reply is None:
            try:
                body = json.dumps({"model": "glmtorch-demo", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": "Good morrow"}]}).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = json.load(response)["choices"][0]["message"]["content"]
            except OSError:
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if proc.returncode not in (0, -15, 143) or reply is None:  # 143: SIGTERM handled (128 + 15)
        hint = HINT.match(err)
        check("glmtorch serve", hint is not None and hint.group(1) == "serve",
              f"exit {proc.returncode}, reply {reply!r}; stderr {err.strip()[-1500:]!r}")
    else:
        check("glmtorch serve", "Traceback" not in err, f"replied {reply!r}" if "Traceback" not in err else err[-2000:])


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="glmtorch-fresh-")
    try:
        start = time.perf_counter()
        result = run("--help")
        check("glmtorch --help", result.returncode == 0 and "chat" in result.stdout,
              f"{time.perf_counter() - start:.2f} s")

        # README's first command, its last step
        start = time.perf_counter()
        result = run("chat", stdin="Good morrow, friend. What news?\n")
        check("echo ... | glmtorch chat", result.returncode == 0 and result.stdout.strip() != ""
              and "Traceback" not in result.stderr,
              f"{time.perf_counter() - start:.1f} s, reply {result.stdout.strip()[:60]!r}"
              if result.returncode == 0 else result.stderr[-2000:])

        result = run("generate", "--prompt", "What news?", "--max-new-tokens", "8", "--seed", "0")
        works_or_hints("glmtorch generate", result, "")
        schema = os.path.join(tmp, "schema.json")
        with open(schema, "w") as f:
            json.dump({"type": "object", "properties": {"mood": {"enum": ["merry", "sad"]}}, "required": ["mood"],
                       "additionalProperties": False}, f)
        result = run("generate", "--prompt", "Thy mood?", "--json-schema", schema, "--max-new-tokens", "16")
        works_or_hints("glmtorch generate --json-schema", result, "")
        if result.returncode == 0:
            check("glmtorch generate --json-schema: JSON", result.stdout.strip().startswith('{"mood": '),
                  repr(result.stdout.strip()[:60]))
        works_or_hints("glmtorch generate --speculate int4",
                       run("generate", "--prompt", "What news?", "--max-new-tokens", "8", "--speculate", "int4"), "")
        check_serve()
        works_or_hints("glmtorch convert DEMO OUT.gguf", run("convert", _demo(), os.path.join(tmp, "d.gguf")), "gguf")
        works_or_hints("glmtorch convert DEMO DIR", run("convert", _demo(), os.path.join(tmp, "d")), "")
        works_or_hints("glmtorch chat HUB/ID", run("chat", "THUDM/glm-4-9b-chat-hf", stdin="hi\n"), "hub",
                       error="downloading it from the Hugging Face hub failed")  # offline here
        works_or_hints("glmtorch bench-serve", run("bench-serve", "http://127.0.0.1:9", "--requests", "1"), "bench")
        data = os.path.join(tmp, "data.txt")
        with open(data, "w") as f:
            f.write("To be, or not to be, that is the question.\n" * 200)
        config = os.path.join(tmp, "cfg.json")
        with open(config, "w") as f:
            json.dump({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": 16}, f)
        works_or_hints("glmtorch train (new model)", run(
            "train", "--data", data, "--config", config, "--vocab-size", "300", "--out", os.path.join(tmp, "t"),
            "--max-steps", "3", "--block-size", "32", "--batch-size", "2", "--eval-every", "3", "--eval-windows",
            "2", "--warmup-steps", "1"), "")
        works_or_hints("glmtorch bench (tiny)", run(
            "bench", "--preset", "tiny", "--prefill", "16", "--new-tokens", "4", "--batch", "1", "--reps", "1"), "bench")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} failed" if failures else "fresh install: every check holds")
    return 1 if failures else 0


def _demo() -> str:
    out = subprocess.run([sys.executable, "-c", "import glmtorch; print(glmtorch.DEMO_MODEL)"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
