"""The kernels' decode attention alone (torch.ops.glmtorch_kernels.paged_attention, the loop the fused decode step,
the paged cache and in-place prefill share): q rows x heads / kv heads x head size over a pool of 16-slot blocks,
every row attending all its slots; median of 7 x 20 calls, the threads torch has.
    python scripts/bench_paged_attention.py"""

import statistics
import time

import torch

from glmtorch import cpuinfo, kernels

CASES = [(64, 6, 2, 32, 160), (16, 32, 2, 128, 512), (64, 16, 2, 64, 200), (1, 6, 2, 32, 160)]


def time_case(rows: int, heads: int, kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype,
              block: int = 16) -> float:
    g = torch.Generator().manual_seed(0)
    per_row = -(-slots // block)
    keys = torch.randn(rows * per_row + 1, kv_heads, block, head_dim, generator=g).to(dtype)
    values = torch.randn_like(keys)
    table = (torch.arange(rows * per_row) + 1).view(rows, per_row)
    last, everywhere = torch.full((rows,), slots - 1), torch.empty(0, dtype=torch.bool)
    q = torch.randn(rows, heads, head_dim, generator=g)

    def run():
        return torch.ops.glmtorch_kernels.paged_attention(q, keys, values, table, last, everywhere, head_dim ** -0.5)

    run()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(20):
            run()
        times.append((time.perf_counter() - start) / 20)
    return statistics.median(times)


def main() -> None:
    if not kernels.available():
        raise SystemExit("the kernels could not be built here (a C++ compiler is needed)")
    cpu = cpuinfo.cpu_description()
    print(f"CPU: {cpu['model']} ({' '.join(cpu['flags'])}), {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        for rows, heads, kv_heads, head_dim, slots in CASES:
            seconds = time_case(rows, heads, kv_heads, head_dim, slots, dtype)
            flops = 4 * rows * heads * slots * head_dim
            print(f"{rows:3d} x {heads}/{kv_heads} x {head_dim:3d}, {slots} slots, {str(dtype)[6:]:8s} cache: "
                  f"{seconds * 1e3:.3f} ms  {flops / seconds / 1e9:.1f} GFLOPS")


if __name__ == "__main__":
    main()
