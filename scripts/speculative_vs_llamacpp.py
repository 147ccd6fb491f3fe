"""Prompt-lookup speculation beside llama.cpp's (`llama-lookup`) on the same weights, the same prompt and the same
greedy text: a copy-heavy prompt (a passage given three times), on the "small" model with a GLM-sized byte-level
BPE tokenizer, so that both sides tokenize the prompt alike (checked). Each side's plain decoding is measured at the
same depth (llama.cpp: `llama-bench -n N -d PROMPT`), and glmtorch's text with speculation must equal its text
without (and is compared with llama.cpp's).

    python scripts/make_bench_checkpoint.py small /tmp/small-serve-fp32 --dtype float32
    LL=~/.cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin   # with llama-lookup built
    python scripts/speculative_vs_llamacpp.py /tmp/small-serve-fp32 --llama-cpp $LL --type f32   # or q4_0

Never from CI (it needs a llama.cpp build and a few minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time

import torch

import glmtorch

PASSAGE = "Here is a passage about the kings of old. " + " ".join(
    ("the quick brown fox jumps over a lazy dog while seven wise kings speak of old times " * 4).split()[:60]) + "."
PROMPT = "Repeat the passage exactly.\n\n" + PASSAGE + "\n\n" + PASSAGE + "\n\n" + PASSAGE[:200]
QUANTIZE = {"f32": None, "q8_0": "int8", "q4_0": "int4"}


def prepare(checkpoint: str, work: str, kind: str) -> tuple[str, str]:
    """(a checkpoint directory with the GLM-sized BPE tokenizer, its GGUF of `kind`)."""
    from glmtorch.bench import glm_sized_tokenizer

    folder = os.path.join(work, "ckpt")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        for name in os.listdir(checkpoint):
            if name.endswith((".safetensors", ".json")) and not name.startswith("tokenizer"):
                os.symlink(os.path.join(os.path.abspath(checkpoint), name), os.path.join(folder, name))
        glm_sized_tokenizer().save_pretrained(folder)
    gguf = os.path.join(work, f"model-{kind}.gguf")
    if not os.path.exists(gguf):
        subprocess.run(["glmtorch", "convert", folder, gguf, "--type", kind], check=True)
    return folder, gguf


def llama_cpp(bin_dir: str, gguf: str, prompt_file: str, prompt_tokens: int, tokens: int, draft: int) -> dict:
    env = {**os.environ, "LD_LIBRARY_PATH": bin_dir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")}
    out = subprocess.run([os.path.join(bin_dir, "llama-lookup"), "-m", gguf, "-f", prompt_file, "-n", str(tokens),
                          "-t", "2", "--spec-draft-n-max", str(draft), "--temp", "0", "-c", "2048"],
                         capture_output=True, env=env)
    log = (out.stdout + out.stderr).decode("utf-8", "replace")
    speed = re.findall(r"decoded\s+(\d+) tokens in\s+([0-9.]+) seconds", log)
    accept = re.findall(r"n_accept\s+=\s+(\d+)", log)
    drafted = re.findall(r"n_drafted\s+=\s+(\d+)", log)
    if out.returncode or not speed:
        raise RuntimeError(f"llama-lookup failed:\n{log[-2000:]}")
    bench = subprocess.run([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-p", "0", "-n", str(tokens), "-d",
                            str(prompt_tokens), "-t", "2", "-r", "3"], capture_output=True, text=True, env=env)
    plain = re.findall(r"tg\d+ @ d\d+ \|\s+([0-9.]+)", bench.stdout)
    text = log.split(open(prompt_file).read(), 1)[-1]
    return {"lookup_tok_s": int(speed[-1][0]) / float(speed[-1][1]), "plain_tok_s": float(plain[-1]) if plain else None,
            "drafted": int(drafted[-1]) if drafted else None, "accepted": int(accept[-1]) if accept else None,
            "text": text}


def ours(folder: str, gguf: str, quantize: str | None, tokens: int, draft: int) -> dict:
    tok = glmtorch.AutoTokenizer.from_pretrained(folder)
    # the GGUF itself: the same (quantized) weights llama.cpp reads
    model = glmtorch.AutoModelForCausalLM.from_pretrained(gguf, dtype="float32",
                                                          **({"quantize": quantize} if quantize else {}))
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])

    def decode(**kw) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=[], **kw)
        total = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=[])  # the prefill alone
        return out[0, ids.shape[1]:], (tokens - 1) / (total - (time.perf_counter() - start))

    plain = [decode() for _ in range(3)]
    spec = [decode(prompt_lookup_num_tokens=draft) for _ in range(3)]
    if not all(torch.equal(s[0], plain[0][0]) for s in plain + spec):
        raise AssertionError("speculation changed glmtorch's greedy text")
    return {"plain_tok_s": statistics.median(s for _, s in plain),
            "lookup_tok_s": statistics.median(s for _, s in spec), "text": tok.decode(plain[0][0].tolist())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a float checkpoint (make_bench_checkpoint.py small)")
    parser.add_argument("--llama-cpp", required=True, help="folder with llama-lookup and llama-bench")
    parser.add_argument("--type", default="f32", choices=sorted(QUANTIZE))
    parser.add_argument("--tokens", type=int, default=73)
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--work", default="/tmp/speculative-vs-llamacpp")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    folder, gguf = prepare(args.checkpoint, args.work, args.type)
    prompt_file = os.path.join(args.work, "prompt.txt")
    with open(prompt_file, "w") as f:
        f.write(PROMPT)
    prompt_tokens = len(glmtorch.AutoTokenizer.from_pretrained(folder).encode(PROMPT, add_special_tokens=False))
    theirs = llama_cpp(args.llama_cpp, gguf, prompt_file, prompt_tokens, args.tokens, args.draft)
    mine = ours(folder, gguf, QUANTIZE[args.type], args.tokens, args.draft)
    same = theirs["text"].startswith(mine["text"][:40])
    print(f"{args.type}, {args.tokens} tokens after a {len(PROMPT)}-character copy-heavy prompt, up to {args.draft} "
          f"proposals a pass; the same greedy text on both sides: {same}")
    print(f"  glmtorch   plain {mine['plain_tok_s']:.1f} tok/s, prompt lookup {mine['lookup_tok_s']:.1f} "
          f"({mine['lookup_tok_s'] / mine['plain_tok_s']:.2f}x)")
    plain = theirs["plain_tok_s"]
    print(f"  llama.cpp  plain {plain or float('nan'):.1f} tok/s, llama-lookup {theirs['lookup_tok_s']:.1f} "
          f"({theirs['lookup_tok_s'] / plain if plain else float('nan'):.2f}x; accepted {theirs['accepted']} of "
          f"{theirs['drafted']} drafted)")
    print(f"  glmtorch / llama.cpp with speculation: {mine['lookup_tok_s'] / theirs['lookup_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
