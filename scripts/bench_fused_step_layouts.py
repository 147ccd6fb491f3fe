"""The fused C++ decode step (glmtorch.fastpath.FusedDecodeStep) of one model with its linears' weights plain and in
the kernels' blocks of 16 rows (kernels.pack_blocks), alternated in one process (the VM's speed drifts too much for
two processes to compare), with the batch split by columns and by rows; medians of 6 rounds of best-of-5 steps.
    python scripts/bench_fused_step_layouts.py [MODEL] [--rows 64] [--length 160]"""

import argparse
import os
import statistics

import torch

from glmtorch import DEMO_MODEL, GlmForCausalLM, cpuinfo, fastpath, kernels
from glmtorch.fastpath import pack_weights, unpack_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=DEMO_MODEL)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=160, help="cache slots each row attends")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the kernels could not be built here (a C++ compiler is needed)")
    model = GlmForCausalLM.from_pretrained(args.model).eval()
    fastpath.use_gemv_linears(model)
    fastpath.use_fused_elementwise(model)
    os.environ["GLMTORCH_PACK"] = "blocks"  # pack_weights then takes blocks for every linear they can hold
    if not pack_weights(model):
        raise SystemExit("the kernels here take no blocks for this model's weights")

    def step_with(layout: str, by_rows: bool):
        pack_weights(model) if layout == "blocks" else unpack_weights(model)
        step = fastpath.FusedDecodeStep(fallback=None)
        step._ensure_plan(model)
        if step.plan is None:
            raise SystemExit("the fused step does not cover this model")

        def run(tokens, positions, slot, mask, cache):
            step._split_rows(by_rows)
            return step._run_plan(model, tokens, positions, slot, mask, cache)
        return run

    cpu = cpuinfo.cpu_description()
    print(f"CPU: {cpu['model']} ({' '.join(cpu['flags'])}), {torch.get_num_threads()} threads; "
          "the linears pack_weights puts in blocks, against plain")
    with torch.no_grad():
        for by_rows in (False, True):
            times: dict[str, list[float]] = {"plain": [], "blocks": []}
            for r in range(6):
                for layout in ("plain", "blocks") if r % 2 else ("blocks", "plain"):
                    times[layout].append(fastpath.time_decode_step(model, args.rows, args.length,
                                                                   step=step_with(layout, by_rows)))
            plain, blocks = (statistics.median(times[k]) * 1e3 for k in ("plain", "blocks"))
            print(f"{args.rows} rows, {args.length} slots, split by {'rows' if by_rows else 'columns'}: "
                  f"plain {plain:.2f} ms, blocks {blocks:.2f} ms ({blocks / plain:.3f}x)")
    unpack_weights(model)


if __name__ == "__main__":
    main()
