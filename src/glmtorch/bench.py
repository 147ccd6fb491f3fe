"""`glmtorch bench`: glmtorch against transformers (and llama.cpp when given a build) on the same weights, in one
process, with interleaved repetitions and medians, through the public path a user takes:

    prefill:  model(input_ids, logits_to_keep=1)
    decode:   model.generate(input_ids, max_new_tokens=N, do_sample=False)   (tok/s of the new tokens)

It also measures the machine's memory bandwidth and reports the roofline: decoding a token reads every weight
once, so (weight bytes) / (bandwidth) is the fastest a batch-1 step can be.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from . import dispatch, kernels
from .cpuinfo import cpu_description
from .fastpath import describe_decode_step, pack_weights
from .extras import install_hint

PRESETS = {
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
    "small": dict(vocab_size=151552, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=2, head_dim=64),
    "glm4-9b": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128),
}


def memory_bandwidth(device: torch.device, mbytes: int = 512) -> float:
    """GB/s of a large read (a sum over a buffer far larger than any cache), median of a few runs."""
    x = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(7):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[2:]) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of every matrix a decode step reads (the linear layers, LM head included; embeddings are a lookup)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or hasattr(module, "weight_bytes"):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
            for b in module.buffers(recurse=False):
                total += b.numel() * b.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def make_checkpoint(preset: str, directory: str, dtype: torch.dtype, seed: int = 0, arch: str = "glm") -> str:
    """Random weights of a preset's shape; `arch` "glm4" gives GLM-4-0414's layer (its two extra norms)."""
    from .auto import AutoModelForCausalLM
    from .config import CONFIG_CLASSES

    torch.manual_seed(seed)
    config = CONFIG_CLASSES[arch](**PRESETS[preset], pad_token_id=0, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.model_class(config)(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.to(dtype).save_pretrained(directory)
    return directory


def glm_sized_tokenizer(vocab_size: int = 151552, seed: int = 0):
    """A byte-level BPE of `vocab_size` tokens shaped like GLM-4's (the 256 bytes, word-like merges with and without
    a leading space, digits and JSON punctuation, GLM-4's special tokens at the end), as a GlmTokenizer: what a
    grammar engine sees of GLM-4, for measuring constrained decoding where the real tokenizer is not at hand."""
    from tokenizers import pre_tokenizers

    from .tokenizer import GLM4_SPECIAL_TOKENS, GlmTokenizer, byte_level_bpe

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges, pieces = [], list(vocab)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < vocab_size - len(GLM4_SPECIAL_TOKENS):
        left = rng.choice(pieces[-5000:] if len(pieces) > 5000 and rng.random() < 0.7 else pieces)
        right = rng.choice(letters + "0123456789" + ('",:{}[]' if rng.random() < 0.05 else ""))
        if rng.random() < 0.05:
            left, right = "\u0120", rng.choice(letters)  # "\u0120": byte-level BPE's space
        token = left + right
        if token in vocab or len(token) > 16:
            continue
        vocab[token] = len(vocab)
        merges.append((left, right))
        pieces.append(token)
    return GlmTokenizer(byte_level_bpe(vocab, merges, GLM4_SPECIAL_TOKENS))  # GLM-4's own pipeline


# what `glmtorch bench --json-schema` constrains to by default: a list of strings, which a random model keeps
# writing (so every timed token is a constrained one)
BENCH_SCHEMA = {"type": "array", "items": {"type": "string"}}


def run_bench(model_path: str | None = None, preset: str = "small", dtype: str = "float32",
              quantize: str | None = None, device: str | None = None, prefill: int = 512, new_tokens: int = 64,
              batches: tuple[int, ...] = (1, 8), reps: int = 5, with_transformers: bool = True,
              llama_cpp: str | None = None, out: str | None = None, arch: str = "glm",
              json_schema: dict | None = None, speculate: int | None = None) -> dict[str, Any]:
    from .auto import AutoModelForCausalLM, AutoTokenizer
    from .checkpoint.safetensors_io import parse_dtype
    from .device import infer_device
    from .tokenizer import TokenizerError

    torch_dtype = parse_dtype(dtype)
    dev = torch.device(device or infer_device())
    tmp = None
    if model_path is None:
        tmp = tempfile.mkdtemp(prefix="glmtorch-bench-")
        model_path = make_checkpoint(preset, tmp, torch_dtype, arch=arch)
    runners: dict[str, Any] = {}
    ours = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, device=dev, quantize=quantize)
    runners["glmtorch"] = ours
    if with_transformers and quantize is None:
        try:
            import transformers

            runners["transformers"] = transformers.AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype).to(dev).eval()
        except ImportError:
            print(f"glmtorch: bench without the transformers side: {install_hint('transformers')}", file=sys.stderr)
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prefill), generator=g).to(dev)
    short = {b: torch.randint(0, vocab, (b, 16), generator=g).to(dev) for b in batches}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in runners}

    constrained = {}
    if json_schema is not None:  # glmtorch again, its output constrained to the schema (generation.constrain)
        results["glmtorch json-schema"] = {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (TokenizerError, OSError):  # a preset has none: one as large as GLM-4's stands in
            tokenizer = glm_sized_tokenizer(vocab)
        constrained = {"response_format": json_schema, "tokenizer": tokenizer}

    def generate(model, ids, n, **kw):
        if _is_hf(model):  # min_new_tokens: random weights must not stop early on an eos id
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], **kw)

    def decode_rate(model, ids, **kw):
        """New tokens per second: a long generation minus a one-token one (which is the prefill)."""
        full = _time(lambda: generate(model, ids, new_tokens + 1, **kw), dev)
        first = _time(lambda: generate(model, ids, 1, **kw), dev)
        return ids.shape[0] * new_tokens / max(full - first, 1e-9)

    llama = _LlamaCpp(ours, model_path, llama_cpp, dtype, quantize, prefill, new_tokens) if llama_cpp else None
    if llama:
        results["llama.cpp"] = {}
    def layout_for(model, rows):  # the weight layout glmtorch takes for batches of `rows` (fastpath.pack_weights)
        if not _is_hf(model):
            pack_weights(model, rows)

    with torch.no_grad():
        for model in runners.values():  # warm-up: compiles the decode step, touches every page
            model(prompt, logits_to_keep=1)
            for b in batches:
                layout_for(model, b)
                decode_rate(model, short[b])
        for _ in range(reps):  # interleaved, so drift on a shared machine hits everyone alike
            for name, model in runners.items():
                r = results[name]
                layout_for(model, 1)
                r.setdefault("prefill_tok_s", []).append(prefill / _time(lambda: model(prompt, logits_to_keep=1), dev))
                for b in batches:
                    layout_for(model, b)
                    r.setdefault(f"decode_b{b}_tok_s", []).append(decode_rate(model, short[b]))
                    if constrained and model is ours:
                        results["glmtorch json-schema"].setdefault(f"decode_b{b}_tok_s", []).append(
                            decode_rate(model, short[b], **constrained))
            layout_for(ours, 1)
            if llama:
                for k, v in llama.run().items():
                    results["llama.cpp"].setdefault(k, []).append(v)
    if llama:
        llama.close()
    speculation = speculation_rates(ours, vocab, new_tokens, reps, speculate, dev) if speculate else None
    bandwidth = memory_bandwidth(dev)
    weights = weight_bytes_per_token(ours)
    report: dict[str, Any] = {
        "model": model_path if tmp is None else f"preset:{preset}" + ("" if arch == "glm" else f" ({arch})"),
        "dtype": dtype, "quantize": quantize,
        "device": str(dev), "cpu": cpu_description(), "kernels": kernels.describe(), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "linear_paths": dispatch.decisions(), "decode_step": describe_decode_step(ours),
        "torch": torch.__version__, "prefill_tokens": prefill, "new_tokens": new_tokens, "reps": reps,
        "weight_bytes_per_token": weights, "bandwidth_gb_s": bandwidth,
        "roofline_decode_b1_tok_s": bandwidth * 1e9 / weights,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()},
        **({"speculation": speculation} if speculation else {}),
        "repetitions": results,
    }
    ours_b1 = report["results"]["glmtorch"].get("decode_b1_tok_s")
    if ours_b1:
        report["fraction_of_roofline"] = ours_b1 / report["roofline_decode_b1_tok_s"]
        report["measured_weight_gb_s"] = ours_b1 * weights / 1e9
    # Each repetition measures everyone within a minute or two, so its ratio is what drift (which moves this shared
    # machine's speed by tens of percent over minutes) touches least: the ratio is the median of those.
    report["ratios"], report["ratio_ranges"] = {}, {}
    for peer, r in results.items():
        if peer == "glmtorch":
            continue
        paired = {k: [a / b for a, b in zip(results["glmtorch"][k], v) if b] for k, v in r.items()
                  if k in results["glmtorch"]}
        report["ratios"][f"glmtorch/{peer}"] = {k: statistics.median(v) for k, v in paired.items() if v}
        report["ratio_ranges"][f"glmtorch/{peer}"] = {k: [min(v), max(v)] for k, v in paired.items() if v}
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        plot_report(report, os.path.splitext(out)[0] + ".png")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _is_hf(model) -> bool:
    return type(model).__module__.startswith("transformers")


class _LlamaCpp:
    """llama.cpp's own llama-bench on the same weights, exported to GGUF (F32, BF16, Q8_0 or Q4_0 to match the
    precision measured), one repetition per call so that it interleaves with the PyTorch runs."""

    def __init__(self, model, model_path, build_dir, dtype, quantize, prefill, new_tokens) -> None:
        from .checkpoint.gguf import write_gguf
        from .auto import AutoTokenizer

        kind = {"int8": "q8_0", "int4": "q4_0"}.get(quantize or "",
                                                    {"bfloat16": "bf16", "bf16": "bf16"}.get(dtype, "f32"))
        self.exe = next((os.path.join(build_dir, *p) for p in (("bin", "llama-bench"), ("llama-bench",))
                         if os.path.isfile(os.path.join(build_dir, *p))), None)
        if self.exe is None:
            raise FileNotFoundError(f"{build_dir}: no llama-bench (build llama.cpp with "
                                    "../shared/peers/llamacpp/build.sh)")
        self.tmp = tempfile.mkdtemp(prefix="glmtorch-llamacpp-")
        self.path = os.path.join(self.tmp, f"model-{kind}.gguf")
        self.prefill, self.new_tokens = prefill, new_tokens
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception:
            from .tokenizer import GLM4_SPECIAL_TOKENS, train_bpe_tokenizer

            tokenizer = train_bpe_tokenizer(["glmtorch benchmark"], 256 + len(GLM4_SPECIAL_TOKENS) + 1)
        write_gguf(model, tokenizer, self.path, kind, progress=False)

    def run(self) -> dict[str, float]:
        result = subprocess.run([self.exe, "-m", self.path, "-p", str(self.prefill), "-n", str(self.new_tokens),
                                 "-r", "1", "-t", str(torch.get_num_threads()), "-o", "json"],
                                capture_output=True, text=True, timeout=1800, check=True)
        out = {}
        for row in json.loads(result.stdout):
            if row.get("n_prompt"):
                out["prefill_tok_s"] = row["avg_ts"]
            elif row.get("n_gen"):
                out["decode_b1_tok_s"] = row["avg_ts"]
        return out

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def plot_report(report: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = sorted({k for r in report["results"].values() for k in r})
    names = list(report["results"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), dpi=110)
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics):
        values = [report["results"][n].get(metric, 0) for n in names]
        ax.bar(names, values, color=["tab:blue", "tab:gray", "tab:orange"][: len(names)])
        ax.set_title(metric.replace("_tok_s", " (tok/s)"))
        if metric == "decode_b1_tok_s":
            ax.axhline(report["roofline_decode_b1_tok_s"], color="red", linestyle="--", label="roofline")
            ax.legend()
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{report['model']} {report['dtype']}{' ' + report['quantize'] if report['quantize'] else ''} "
                 f"on {report['device']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def speculation_rates(model, vocab: int, new_tokens: int, reps: int, num_tokens: int, dev) -> dict[str, Any]:
    """Batch-1 decode with prompt-lookup speculation (generation.speculate) against without, on two workloads:
    "repetitive" (greedy after a prompt that repeats a passage: where output repeats input, or the model falls into
    a loop) and "free" (sampled at temperature 1 from a random prompt: proposals mostly fail and back off)."""
    g = torch.Generator().manual_seed(1)
    passage = torch.randint(0, vocab, (1, 96), generator=g)
    workloads = {"repetitive": (torch.cat([passage, passage, passage[:, :48]], 1).to(dev), dict(do_sample=False)),
                 "free": (torch.randint(0, vocab, (1, 64), generator=g).to(dev),
                          dict(do_sample=True, temperature=1.0, top_k=0, seed=3))}
    out: dict[str, Any] = {"num_speculative_tokens": num_tokens}
    for name, (ids, kw) in workloads.items():
        plain, fast, per_pass = [], [], []
        model.generate(ids, max_new_tokens=8, eos_token_id=[], prompt_lookup_num_tokens=num_tokens, **kw)  # warm-up
        def rate(**extra) -> float:  # new tokens per second, the prefill (a one-token generation) taken out
            full = _time(lambda: model.generate(ids, max_new_tokens=new_tokens + 1, eos_token_id=[], **kw, **extra),
                         dev)
            return new_tokens / max(full - _time(lambda: model.generate(ids, max_new_tokens=1, eos_token_id=[], **kw),
                                                 dev), 1e-9)

        for _ in range(reps):
            plain.append(rate())
            fast.append(rate(prompt_lookup_num_tokens=num_tokens))
            decoder = model._glmtorch_speculation
            per_pass.append((decoder.accepted + decoder.rounds) / max(1, decoder.rounds))
        out[name] = {"plain_tok_s": statistics.median(plain), "speculative_tok_s": statistics.median(fast),
                     "speedup": statistics.median(f / p for f, p in zip(fast, plain)),
                     "tokens_per_pass": statistics.median(per_pass)}
    return out


def _kernels_line(built: dict | None) -> str:
    if not built or built.get("build") == "none":
        return "none (library paths)"
    return f"-march={built['march']}"


def format_report(report: dict[str, Any]) -> str:
    cpu = report.get("cpu", {})
    lines = [f"{report['model']}  dtype={report['dtype']} quantize={report['quantize']} device={report['device']} "
             f"threads={report['threads']}",
             *([f"GPU: {report['gpu']}"] if report.get("gpu") else []),
             f"CPU: {cpu.get('model', '?')} ({', '.join(cpu.get('flags', [])) or 'no matrix flags'}); "
             f"kernels: {_kernels_line(report.get('kernels'))}",
             f"bandwidth {report['bandwidth_gb_s']:.1f} GB/s, weights {report['weight_bytes_per_token'] / 1e6:.1f} MB "
             f"per token -> roofline {report['roofline_decode_b1_tok_s']:.1f} tok/s at batch 1"]
    for name, r in report["results"].items():
        lines.append(f"  {name:13s} " + "  ".join(f"{k}={v:.1f}" for k, v in sorted(r.items())))
    for peer, r in report["ratios"].items():
        spread = report.get("ratio_ranges", {}).get(peer, {})
        lines.append(f"  {peer:24s} " + "  ".join(
            f"{k}={v:.2f}x" + (" ({:.2f}-{:.2f})".format(*spread[k]) if report["reps"] > 1 and k in spread else "")
            for k, v in sorted(r.items())))
    if report.get("decode_step"):
        lines.append(f"  decode step: {report['decode_step']}")
    if report.get("linear_paths"):  # which path glmtorch's products took, per weight and row count
        by_matrix: dict[str, list[str]] = {}
        for key, path in report["linear_paths"].items():
            matrix, rows = key.rsplit(" ", 1)
            if not rows.startswith("rows<="):  # a key of another shape (an older table's): not shown
                continue
            for prefix, shown in (("layout", "weight layout (plain, packed or blocks)"),
                                  ("fused-step", "fused C++ step")):
                matrix = shown if matrix.startswith(prefix) else matrix  # whole-model choices: the shapes say little
            by_matrix.setdefault(matrix, []).append(f"{rows}: {path}")
        lines.append("  linear paths (measured here): " + "; ".join(
            f"{m} [{', '.join(sorted(v, key=lambda r: int(r.split('<=')[1].split(':')[0])))}]"
            for m, v in sorted(by_matrix.items())))
    for name, r in (report.get("speculation") or {}).items():
        if isinstance(r, dict):
            lines.append(f"  speculation ({name}, batch 1): {r['speculative_tok_s']:.1f} tok/s against "
                         f"{r['plain_tok_s']:.1f} = {r['speedup']:.2f}x, {r['tokens_per_pass']:.2f} tokens per pass")
    if "fraction_of_roofline" in report:
        lines.append(f"  glmtorch batch-1 decode reads weights at {report['measured_weight_gb_s']:.1f} GB/s = "
                     f"{100 * report['fraction_of_roofline']:.0f}% of the measured bandwidth")
    return "\n".join(lines)
