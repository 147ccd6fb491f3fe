#!/usr/bin/env bash
# The checks a session lent a GPU runs there: the accelerator tests (tests/test_accelerator.py), then
# `glmtorch bench` against transformers on "small" bf16, eager and compiled, then the engine's 64-prompt burst
# (scripts/offline_burst.py). Each part has its own time limit, so a hang costs that part alone.
#
#   OUT=results bash scripts/gpu_checks.sh [tests|bench|burst ...]   (default: all three)
#
# Writes to $OUT: log.txt (everything, in order), tests.log, and each run's JSON report. Needs torch with CUDA,
# transformers, pytest, and glmtorch's dependencies; PYTHONPATH takes src/, so nothing is installed.
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
scratch=$(mktemp -d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
parts=${*:-tests bench burst}
log="$OUT/log.txt"
say() { echo "== $(date +%T) $*" | tee -a "$log"; }

say "env"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  lscpu | grep -E "Model name|^CPU\(s\)"; } >>"$log" 2>&1

if [[ " $parts " == *" tests "* ]]; then
  say "tests"
  timeout "${TESTS_LIMIT:-170}" python3 -m pytest -q -p no:cacheprovider tests/test_accelerator.py -rfEs --durations 8 \
    >"$OUT/tests.log" 2>&1
  say "tests rc=$?"; tail -n 25 "$OUT/tests.log" >>"$log"
fi

if [[ " $parts " == *" bench "* ]]; then
  for compile in ${BENCH_COMPILE:-0 1}; do
    say "bench small bf16 GLMTORCH_COMPILE=$compile"
    GLMTORCH_COMPILE=$compile TORCH_LOGS=${TORCH_LOGS:-perf_hints} timeout "${BENCH_LIMIT:-110}" python3 -m glmtorch bench \
      --device cuda --preset small --dtype bfloat16 --batch ${BENCH_BATCH:-1 8 64} --reps 2 --prefill 256 \
      --new-tokens 32 --out "$scratch/bench.json" >>"$log" 2>&1
    say "bench rc=$?"
    cp "$scratch/bench.json" "$OUT/bench-small-bf16-compile$compile.json" 2>/dev/null; rm -f "$scratch/bench.json"
  done
fi

if [[ " $parts " == *" burst "* ]]; then
  for compile in ${BURST_COMPILE:-0 1}; do
    say "offline burst small bf16 GLMTORCH_COMPILE=$compile"
    GLMTORCH_COMPILE=$compile TORCH_LOGS=${TORCH_LOGS:-perf_hints} timeout "${BURST_LIMIT:-90}" python3 scripts/offline_burst.py \
      --device cuda --dtype bfloat16 --new-tokens 32 --out "$OUT/burst-small-bf16-compile$compile.json" >>"$log" 2>&1
    say "burst rc=$?"
  done
fi
rm -rf "$scratch"
say "done"
