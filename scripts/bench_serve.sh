#!/usr/bin/env bash
# The serving figures in README: start `glmtorch serve MODEL` (the demo model when MODEL is ""), warm up the
# compiled decode step for the batch sizes used, then run bench-serve three ways and stop the server.
#   bash scripts/bench_serve.sh NAME MODEL PORT        e.g.  bash scripts/bench_serve.sh demo "" 8011
#   (a random "small" model that shows every token as text: python scripts/make_bench_checkpoint.py small DIR)
# Writes benchmarks/serve-NAME-{c64,c1,ttft}.json.
set -euo pipefail
NAME=$1; MODEL=$2; PORT=$3
URL=http://127.0.0.1:$PORT
glmtorch serve $MODEL --port "$PORT" --max-num-seqs 64 --max-queue 256 --max-context 512 > "/tmp/serve-$NAME.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "$URL/health" > /dev/null && break; sleep 1; done
for c in 64 17 1; do  # warm-up: compile the step for the row counts below
  glmtorch bench-serve "$URL" --requests "$c" --concurrency "$c" --max-tokens 4 --prompt-words 100 > /dev/null
done
glmtorch bench-serve "$URL" --requests 64 --concurrency 64 --max-tokens 64 --prompt-words 100 --out "benchmarks/serve-$NAME-c64.json"
glmtorch bench-serve "$URL" --requests 8 --concurrency 1 --max-tokens 64 --prompt-words 100 --out "benchmarks/serve-$NAME-c1.json"
glmtorch bench-serve "$URL" --ttft-under-load 16 --max-tokens 256 --prompt-words 100 --out "benchmarks/serve-$NAME-ttft.json"
