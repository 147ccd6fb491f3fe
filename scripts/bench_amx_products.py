"""The matrix products of "small" at a few row counts, each path the dispatch can take, timed side by side: bf16
(glmtorch's AMX tiles, its FMA kernel, oneDNN on the plain and on the packed weight) and row-interleaved int4 (the
vector kernels and the AMX tiles). Random weights of small's five shapes (qkv, o, gate_up, down, LM head), each
once; the sum of the best of N runs of each. Prints the CPU. Never from CI.

    python scripts/bench_amx_products.py --rows 1 8 16 32 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from glmtorch import fastpath, kernels
from glmtorch.cpuinfo import cpu_description
from glmtorch.quantize import Int4Linear

SHAPES = [(1280, 1024), (1024, 1024), (5632, 1024), (1024, 2816), (151552, 1024)]


def best(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), {cpu['cores']} cores; AMX granted: "
          f"{kernels.amx_available()}; {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    bf16 = [torch.randn(n, k).bfloat16() for n, k in SHAPES]
    packed = [fastpath._reorder(w) for w in bf16]
    int4 = []
    for n, k in SHAPES:
        layer = Int4Linear.from_linear(torch.nn.Linear(k, n, bias=False))
        layer.interleave_rows(kernels.int4_row_interleave())
        int4.append(layer)
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in (1024, 2816)}
        paths = {
            "bf16 amx": lambda w, pw, x: kernels.gemv_amx(x, w) if kernels.amx_available() else None,
            "bf16 fma kernel": lambda w, pw, x: kernels.gemv(x, w),
            "bf16 oneDNN plain": lambda w, pw, x: F.linear(x.bfloat16(), w),
            "bf16 oneDNN packed": lambda w, pw, x: fastpath._packed_linear(x.bfloat16(), pw),
        }
        line = []
        for name, fn in paths.items():
            total = sum(best(lambda: fn(w, pw, xs[w.shape[1]]), args.runs) for w, pw in zip(bf16, packed))
            line.append(f"{name} {total * 1e3:.2f} ms")
        for name, amx in (("int4 vector", False), ("int4 amx", True)):
            if amx and not kernels.amx_available():
                continue
            fn = ((lambda l, x: kernels.gemv_int4_amx(x, l.weight, l.scales)) if amx else
                  (lambda l, x: kernels.gemv_int4(x, l.weight, l.scales, l.group_size, l.interleave)))
            total = sum(best(lambda: fn(layer, xs[layer.in_features]), args.runs) for layer in int4)
            line.append(f"{name} {total * 1e3:.2f} ms")
        print(f"{rows} rows: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main()
