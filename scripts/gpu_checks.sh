#!/usr/bin/env bash
# The checks a session lent a GPU runs there: the accelerator tests (tests/test_accelerator.py), then
# `glmtorch bench` against transformers on "small" bf16, eager and compiled, then the engine's 64-prompt burst
# (scripts/offline_burst.py), then `glmtorch serve` on the GPU under `glmtorch bench-serve` (64 at once, then one
# at a time). Each part has its own time limit, so a hang costs that part alone.
#
#   OUT=results bash scripts/gpu_checks.sh [tests|bench|burst|serve ...]   (default: all four)
#
# DEVICE (default cuda) and PRESET (default small) let the script be tried on a CPU: DEVICE=cpu PRESET=tiny.
# Writes to $OUT: log.txt (everything, in order), tests.log, and each run's JSON report. Needs torch with CUDA,
# transformers, pytest, and glmtorch's dependencies; PYTHONPATH takes src/, so nothing is installed. The device
# tool's image (see /work/.library/device) lacked fastapi and uvicorn in 2026-12: carry them as wheels, downloaded
# here into .whl/ (git-ignored via .git/info/exclude) with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
#     manylinux_2_17_x86_64 --platform any -d .whl fastapi starlette pydantic pydantic_core annotated-types
#     typing-inspection uvicorn httptools typing_extensions opentelemetry-api annotated-doc
# and installed there first: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
scratch=$(mktemp -d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
parts=${*:-tests bench burst serve}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small}
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
    say "bench $PRESET bf16 GLMTORCH_COMPILE=$compile"
    GLMTORCH_COMPILE=$compile TORCH_LOGS=${TORCH_LOGS:-perf_hints} timeout "${BENCH_LIMIT:-110}" \
      python3 -m glmtorch bench \
      --device "$DEVICE" --preset "$PRESET" --dtype bfloat16 --batch ${BENCH_BATCH:-1 8 64} --reps 2 --prefill 256 \
      --new-tokens 32 --out "$scratch/bench.json" >>"$log" 2>&1
    say "bench rc=$?"
    cp "$scratch/bench.json" "$OUT/bench-$PRESET-bf16-compile$compile.json" 2>/dev/null; rm -f "$scratch/bench.json"
  done
fi

if [[ " $parts " == *" burst "* ]]; then
  for compile in ${BURST_COMPILE:-0 1}; do
    say "offline burst $PRESET bf16 GLMTORCH_COMPILE=$compile"
    GLMTORCH_COMPILE=$compile TORCH_LOGS=${TORCH_LOGS:-perf_hints} timeout "${BURST_LIMIT:-90}" \
      python3 scripts/offline_burst.py \
      --device "$DEVICE" --preset "$PRESET" --dtype bfloat16 --new-tokens 32 \
      --out "$OUT/burst-$PRESET-bf16-compile$compile.json" >>"$log" 2>&1
    say "burst rc=$?"
  done
fi
if [[ " $parts " == *" serve "* ]]; then
  say "serve $PRESET bf16 on $DEVICE"
  url=http://127.0.0.1:8050
  timeout 60 python3 scripts/make_bench_checkpoint.py "$PRESET" "$scratch/model" --dtype bfloat16 >>"$log" 2>&1
  timeout "${SERVE_LIMIT:-150}" python3 -m glmtorch serve "$scratch/model" --device "$DEVICE" --port 8050 \
    >>"$log" 2>&1 &
  server=$!
  python3 - "$url" <<'WAIT' >>"$log" 2>&1
import sys, time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
WAIT
  for c in 64 1; do  # a short warm-up at each concurrency, then the measured run
    timeout 60 python3 -m glmtorch bench-serve "$url" --requests "$c" --concurrency "$c" --max-tokens 4 \
      --prompt-words 125 >/dev/null 2>&1
  done
  timeout 60 python3 -m glmtorch bench-serve "$url" --requests 64 --concurrency 64 --max-tokens 64 --prompt-words 125 \
    --out "$OUT/serve-$PRESET-bf16-c64.json" >>"$log" 2>&1
  timeout 60 python3 -m glmtorch bench-serve "$url" --requests 4 --concurrency 1 --max-tokens 64 --prompt-words 125 \
    --out "$OUT/serve-$PRESET-bf16-c1.json" >>"$log" 2>&1
  kill -TERM "$server" 2>/dev/null; wait "$server"
  say "serve done"
fi
rm -rf "$scratch"
say "done"
