#!/usr/bin/env bash
# One run on every core vs runs pinned one core each (what `study.py --jobs N` does), MTT IPC 1.
#
#   bash benchmarks/bench_pinning.sh EXPERTS_DIR [ITERATIONS]
#
# Three arrangements, one after another: one run unpinned, one run on core 0, and one run per
# core at once. Prints each run's s/iter (the last logged window; the first includes the
# compile). Run it on a quiet machine: the ratio between the arrangements is the figure to read.
set -eu
EXPERTS=${1:?usage: bench_pinning.sh EXPERTS_DIR [ITERATIONS]}
ITERS=${2:-10}
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CORES=$($PY -c "import os; print(' '.join(map(str, sorted(os.sched_getaffinity(0)))))")

one() {  # one(name, seed, taskset-prefix...)
  local name=$1 seed=$2
  shift 2
  JAX_PLATFORMS=cpu "$@" "$PY" run.py --config=configs/fashion_mnist.py:mtt,ipc1 \
    --workdir="$TMP/$name" --config.seed="$seed" --config.distill.iterations="$ITERS" \
    --config.distill.eval_every=0 --config.distill.checkpoint_every=0 --config.mi.weight=0.0 \
    --config.eval.num_models=1 --config.eval.epochs=1 --config.mtt.experts_dir="$EXPERTS" \
    >"$TMP/$name.log" 2>&1
}
rate() { grep -o '"s_per_iter": [0-9.]*' "$TMP/$1/metrics.jsonl" | tail -1 | cut -d' ' -f2; }

one all 0
echo "one run, cores $CORES: $(rate all) s/iter"
one pinned 0 taskset -c "${CORES%% *}"
echo "one run, core ${CORES%% *}: $(rate pinned) s/iter"
for c in $CORES; do one "side$c" "$c" taskset -c "$c" & done
wait
for c in $CORES; do echo "side by side, core $c: $(rate "side$c") s/iter"; done
