"""The serving engine's batching gain without HTTP: N prompts at once through `glmtorch.LLM` against the same
kind of prompt one at a time, on random weights of a `glmtorch bench` preset, on any device.

    python scripts/offline_burst.py --preset small --dtype bfloat16 --device cuda [--prompts 64] [--new-tokens 64]
    python scripts/offline_burst.py --preset demo --rounds 5

--preset demo takes the shipped demo model with the server's defaults (prefix caching on) and bench-serve's prompts
(its 100-word completions, all cached but their last partial block after the first round): issue 22's served burst
without the HTTP side, the burst and one at a time alternated for --rounds rounds, medians reported.
Prints one JSON object (and writes it to --out): output tok/s of the burst and of one at a time, their ratio,
the decode step the engine took, the device and the CPU."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import glmtorch
from glmtorch.bench import glm_sized_tokenizer, make_checkpoint
from glmtorch.cpuinfo import cpu_description
from glmtorch.fastpath import describe_decode_step
from glmtorch.serve.engine import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--alone", type=int, default=4, help="prompts timed one at a time")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="rounds of the burst and one at a time, alternated")
    p.add_argument("--step-times", action="store_true",
                   help="also time the bursts' full-width decode steps (the model's call and the engine's Python "
                        "around it) and prefill passes, medians in ms")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    device = args.device or glmtorch.infer_device()
    if args.preset == "demo":
        from glmtorch.serve.bench import _request

        llm = glmtorch.LLM(os.path.join(os.path.dirname(glmtorch.__file__), "demo_model"), device=device)
        model, args.dtype = llm.model, str(llm.model.dtype).removeprefix("torch.")
        prompts = [_request("", "", i, 100, args.new_tokens, False, 0.0)[1]["prompt"] for i in range(args.prompts)]
        prompts += prompts[:args.alone] + prompts[-2:]  # one at a time: bench-serve's first requests again
    else:
        with tempfile.TemporaryDirectory(prefix="glmtorch-burst-") as folder:
            path = make_checkpoint(args.preset, folder, getattr(torch, args.dtype))
            model = glmtorch.AutoModelForCausalLM.from_pretrained(path, device=device)
        tokenizer = glm_sized_tokenizer(model.config.vocab_size)
        llm = glmtorch.LLM(model, tokenizer, prefix_caching=False)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, min(150000, model.config.vocab_size), (args.prompt_tokens,), generator=g).tolist()
                   for _ in range(args.prompts + args.alone + 2)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def rate(batch) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)

    warm = time.perf_counter()
    rate(prompts[-2:-1])  # builds (compiles) the one-row step
    rate(prompts[-2:])  # and the batched one
    if args.preset == "demo":
        rate(prompts[:args.prompts])  # caches the prompts' full blocks, as bench-serve's warm-up does served
    warm = time.perf_counter() - warm
    alones, bursts = [], []
    timings = EngineCallTimes() if args.step_times else None
    for _ in range(max(1, args.rounds)):  # in turn, so that a slow stretch of a shared machine hits both alike
        alones.append(sorted(rate([q]) for q in prompts[args.prompts:args.prompts + args.alone])[args.alone // 2])
        bursts.append(rate(prompts[:args.prompts]))
    alone, burst = statistics.median(alones), statistics.median(bursts)
    report = {
        "preset": args.preset, "dtype": args.dtype, "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "cpu": cpu_description(), "torch": torch.__version__, "compile": os.environ.get("GLMTORCH_COMPILE", ""),
        "decode_step": describe_decode_step(model), "prompts": args.prompts, "new_tokens": args.new_tokens,
        "warm_up_s": round(warm, 2), "alone_tok_s": round(alone, 1), "burst_tok_s": round(burst, 1),
        "ratio": round(burst / alone, 2), "rounds": len(bursts),
        "ratios": [round(b / a, 2) for a, b in zip(alones, bursts)],
    }
    if timings is not None:
        report["step_times_ms"] = timings.summary(args.prompts)
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


class EngineCallTimes:
    """Wraps the engine's decode step, its call of the model and its prefill pass (for the rest of the process)
    to time each call: where a burst's time goes without the HTTP side."""

    def __init__(self) -> None:
        from glmtorch.serve.engine import Engine

        self.steps, self.prefills = [], []  # (rows, whole step s, model call s); (requests, s)
        step, call, prefill = Engine._decode_step, Engine._op_step, Engine._prefill

        def timed_step(engine):
            began, self.call = time.perf_counter(), 0.0
            rows = sum(1 for r in engine.running if r is not engine.chunking)
            step(engine)
            self.steps.append((rows, time.perf_counter() - began, self.call))

        def timed_call(engine, *args, **kwargs):
            began = time.perf_counter()
            out = call(engine, *args, **kwargs)
            self.call = time.perf_counter() - began
            return out

        def timed_prefill(engine, requests):
            began = time.perf_counter()
            prefill(engine, requests)
            self.prefills.append((len(requests), time.perf_counter() - began))

        Engine._decode_step, Engine._op_step, Engine._prefill = timed_step, timed_call, timed_prefill

    def summary(self, rows: int) -> dict:
        full = [(s, c) for n, s, c in self.steps if n == rows]
        ms = lambda xs: round(statistics.median(xs) * 1e3, 3) if xs else None  # noqa: E731
        return {"full_steps": len(full), "step": ms([s for s, _ in full]), "model_call": ms([c for _, c in full]),
                "python": ms([s - c for s, c in full]),
                "prefill_passes": [round(s * 1e3, 1) for n, s in self.prefills if n > 1]}


if __name__ == "__main__":
    main()
