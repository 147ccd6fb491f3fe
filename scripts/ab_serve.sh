#!/usr/bin/env bash
# A/B of two glmtorch versions serving the same model, alternated (old, new, old, new), same flags, same client
# lines: a regression check for the serving engine. OLD_SRC / NEW_SRC are the `src` folders of two checkouts (e.g.
# `git worktree add /tmp/old <commit>`), run from this venv with PYTHONPATH pointing at each.
#   OLD_SRC=/tmp/old/src NEW_SRC=$PWD/src TAG=ab-paged-s11-small-fp32 bash scripts/ab_serve.sh /tmp/small-serve-fp32
# Reports: benchmarks/$TAG-{old,new}-{1,2}-{c64,c1}.json (each names the CPU it ran on).
# FLAGS: the servers' flags; unset, the eleventh session's; FLAGS="" serves with the defaults (issue 22's case).
M=${1:?checkpoint directory}
TAG=${TAG:-ab}
FLAGS=${FLAGS---max-batch 64 --max-queue 256 --max-context 1024 --no-prefix-caching}
for round in 1 2; do
  for side in old new; do
    if [ $side = old ]; then PP=${OLD_SRC:?}; else PP=${NEW_SRC:?}; fi
    # each side its own dispatch table: one shared file would be re-measured at every switch (its key names the
    # kernels' build), inside the measured runs
    GLMTORCH_DISPATCH_CACHE=/tmp/ab_dispatch_$side.json PYTHONPATH=$PP python -m glmtorch serve $M --port 8040 $FLAGS \
      > /tmp/ab_$side.log 2>&1 &
    SP=$!
    for i in $(seq 1 400); do curl -sf http://127.0.0.1:8040/health >/dev/null && break; sleep 1; done
    U=http://127.0.0.1:8040
    for c in 64 17 1; do glmtorch bench-serve $U --requests $c --concurrency $c --max-tokens 4 --prompt-words 125 > /dev/null; done
    glmtorch bench-serve $U --requests 64 --concurrency 64 --max-tokens 64 --prompt-words 125 --out benchmarks/$TAG-$side-$round-c64.json
    glmtorch bench-serve $U --requests 4 --concurrency 1 --max-tokens 64 --prompt-words 125 --out benchmarks/$TAG-$side-$round-c1.json
    kill -TERM $SP; wait $SP
  done
done
