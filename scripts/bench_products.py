"""Time every matrix product of one "small" decode step (16 layers' four products and the LM head, weights on
huge pages as loaded ones are), glmtorch's kernels against the library's F.linear, at the given row counts:
rounds alternate the two so a burst of load on a shared machine hits both alike; medians reported, with the CPU.

    python scripts/bench_products.py --dtype bfloat16 --rows 1 8 16 32 64
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from glmtorch import kernels
from glmtorch.bench import PRESETS
from glmtorch.cpuinfo import cpu_model_and_flags
from glmtorch.hugepages import place_on_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the kernels could not be built here")
    dtype = getattr(torch, args.dtype)
    p = PRESETS["small"]
    hidden, kv = p["hidden_size"], p["num_key_value_heads"] * p["head_dim"]
    shapes = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * p["intermediate_size"], hidden),
              (hidden, p["intermediate_size"])]
    torch.manual_seed(0)
    weights = [place_on_cpu(torch.randn(n, k).to(dtype)) for _ in range(p["num_hidden_layers"]) for n, k in shapes]
    weights.append(place_on_cpu(torch.randn(p["vocab_size"], hidden).to(dtype)))
    params = sum(w.numel() for w in weights)
    model, _ = cpu_model_and_flags()
    megabytes = params * weights[0].element_size() / 1e6
    print(f"{model}, {torch.get_num_threads()} threads, {args.dtype}, {megabytes:.0f} MB")
    paths = {"kernels": lambda x, w: torch.ops.glmtorch_kernels.gemv_float(x, w),
             "library": lambda x, w: F.linear(x.to(w.dtype), w)}
    if all(kernels.takes_blocks(w.dtype, *w.shape) for w in weights):  # the same matrices in blocks of 16 rows
        blocks = {id(w): place_on_cpu(kernels.pack_blocks(w)) for w in weights}
        paths["blocks"] = lambda x, w: torch.ops.glmtorch_kernels.gemv_blocks(x, blocks[id(w)])
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
        times = {name: [] for name in paths}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    for w in weights:
                        fn(inputs[w.shape[1]], w)
                    times[name].append(time.perf_counter() - start)
        line = []
        for name, ts in times.items():
            t = statistics.median(ts)
            line.append(f"{name} {t * 1e3:6.1f} ms ({2 * rows * params / t / 1e9:4.0f} GFLOPS)")
        print(f"{rows:4d} rows: " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
