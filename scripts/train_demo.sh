#!/usr/bin/env bash
# Reproduce the demo model that ships in src/glmtorch/demo_model (about 20 minutes on 2 CPU cores).
#   bash scripts/train_demo.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/glmtorch-demo}
python scripts/make_shakespeare_chat.py data/tinyshakespeare.txt "$work/data"
glmtorch train --data "$work/data/train.jsonl" --val-data "$work/data/val.jsonl" --out "$work/checkpoint" \
  --config scripts/demo_config.json --vocab-size 3072 --block-size 256 --batch-size 16 --lr 2e-3 \
  --warmup-steps 100 --max-steps 800 --eval-every 100 --eval-windows 100000 --seed 0 --compile --device cpu
python scripts/export_demo.py "$work/checkpoint" src/glmtorch/demo_model
