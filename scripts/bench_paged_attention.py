"""The kernels' decode attention alone (torch.ops.glmtorch_kernels.paged_attention, the loop the fused decode step,
the paged cache and in-place prefill share): q rows x heads / kv heads x head size over a pool of 16-slot blocks,
every row attending all its slots; median of 7 x 20 calls, the threads torch has. --pools N cycles through N pools
(one per layer, as a decode step reads them): 6 of the demo model's case are ~31 MB, past a 32 MiB L3 with the rest.
    python scripts/bench_paged_attention.py [--pools 6] [--keys-by-slot]
The pools are laid out as a server's (cache.random_pool: keys by element where the kernels read them);
--keys-by-slot stores the keys slot by slot instead, the layout before keys by element, for comparison.
--prefill times prompts' passes instead (paged_prefill_attention, the tiles a prefill after a cached prefix reads
in place) beside the same queries a row at a time (paged_attention) and SDPA on keys gathered from the pool (the
gather counted, as PagedKVCache.update makes it): runs x new tokens after a prefix of cached slots, median of 7
rounds that run the three in turn.
    python scripts/bench_paged_attention.py --prefill"""

import argparse
import statistics
import time

import torch

from glmtorch import cpuinfo, kernels
from glmtorch.cache import random_pool

CASES = [(64, 6, 2, 32, 160), (16, 32, 2, 128, 512), (64, 16, 2, 64, 200), (1, 6, 2, 32, 160)]
# runs, new tokens, cached slots before them, heads, kv heads, head size: the demo burst's prefill after its prompts'
# cached blocks, 8 questions after a 1,500-token shared preamble ("small"), a 4K prompt's later chunks, fresh prompts
PREFILL_CASES = [(64, 15, 128, 6, 2, 32), (8, 30, 1500, 16, 2, 64), (1, 512, 1024, 16, 2, 64),
                 (1, 512, 3584, 16, 2, 64), (4, 128, 0, 16, 2, 64), (1, 512, 1024, 32, 2, 128)]


def time_case(rows: int, heads: int, kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype,
              block: int = 16, pools: int = 1, by_element: bool | None = None) -> float:
    g = torch.Generator().manual_seed(0)
    per_row = -(-slots // block)
    caches = [random_pool(rows * per_row + 1, kv_heads, block, head_dim, dtype, g, by_element) for _ in range(pools)]
    table = (torch.arange(rows * per_row) + 1).view(rows, per_row)
    last, everywhere = torch.full((rows,), slots - 1), torch.empty(0, dtype=torch.bool)
    q = torch.randn(rows, heads, head_dim, generator=g)

    calls = [0]

    def run():
        keys, values = caches[calls[0] % pools]
        calls[0] += 1
        return torch.ops.glmtorch_kernels.paged_attention(q, keys, values, table, last, everywhere, head_dim ** -0.5)

    run()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(20):
            run()
        times.append((time.perf_counter() - start) / 20)
    return statistics.median(times)


def time_prefill(runs: int, new: int, start: int, heads: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> dict[str, float]:
    """Median seconds of one pass each way (glmtorch.cache.prefill_attention_ways)."""
    from glmtorch.cache import prefill_attention_ways

    q, ways = prefill_attention_ways(dtype, heads, kv_heads, head_dim, runs, new, start + new)
    names = {"in_place": "tiles", "row_at_a_time": "row at a time", "gathered": "SDPA, gathered"}
    for run in ways.values():
        run(q)
    times = {name: [] for name in ways}
    for _ in range(7):  # the ways in turn, so that a slow stretch of a shared machine hits each alike
        for name, run in ways.items():
            began = time.perf_counter()
            run(q)
            times[name].append(time.perf_counter() - began)
    return {names[name]: statistics.median(times[name]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=1, help="pools to cycle through (default 1)")
    parser.add_argument("--prefill", action="store_true", help="time prompts' passes (see above)")
    parser.add_argument("--keys-by-slot", action="store_true",
                        help="decode cases: keys stored slot by slot, as before keys by element (cache.random_pool)")
    args = parser.parse_args()
    pools = max(1, args.pools)
    if not kernels.available():
        raise SystemExit("the kernels could not be built here (a C++ compiler is needed)")
    cpu = cpuinfo.cpu_description()
    print(f"CPU: {cpu['model']} ({' '.join(cpu['flags'])}), {torch.get_num_threads()} threads, {pools} pool(s)")
    if args.prefill:
        for runs, new, start, heads, kv_heads, head_dim in PREFILL_CASES:
            dtype = torch.bfloat16 if head_dim == 128 else torch.float32
            times = time_prefill(runs, new, start, heads, kv_heads, head_dim, dtype)
            flops = 4 * runs * new * heads * (start + (new + 1) / 2) * head_dim  # each token: its visible slots
            print(f"{runs:2d} x {new:3d} new after {start:4d}, {heads}/{kv_heads} x {head_dim:3d}, "
                  f"{str(dtype)[6:]:8s}: " + ", ".join(f"{name} {t * 1e3:.2f} ms ({flops / t / 1e9:.0f} GFLOPS)"
                                                       for name, t in times.items()))
        return
    for dtype in (torch.float32, torch.bfloat16):
        for rows, heads, kv_heads, head_dim, slots in CASES:
            seconds = time_case(rows, heads, kv_heads, head_dim, slots, dtype, pools=pools,
                                by_element=False if args.keys_by_slot else None)
            flops = 4 * rows * heads * slots * head_dim
            print(f"{rows:3d} x {heads}/{kv_heads} x {head_dim:3d}, {slots} slots, {str(dtype)[6:]:8s} cache: "
                  f"{seconds * 1e3:.3f} ms  {flops / seconds / 1e9:.1f} GFLOPS")


if __name__ == "__main__":
    main()
