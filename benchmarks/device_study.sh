#!/usr/bin/env bash
# Published-protocol study runs (issues 12, 13 and 25) on a lent GPU, in one device call of under
# 10 minutes. PREPARED, NOT YET RUN ON A DEVICE: no session so far was lent one.
#
#   here:         make device-carry       (ml-collections wheel -> .whl/, Fashion-MNIST -> .data/)
#   device tool:  run(command="bash benchmarks/device_study.sh", carry=[".whl", ".data"],
#                     timeout_s=600)
#   back here:    tar xzf <files_at>/results.tgz   (in the repo root; runs.tgz holds the
#                 unfinished runs' checkpoints: untar it too and carry "runs/study" next call), then
#                 python benchmarks/study.py benchmarks/studies/published/study.toml --report
#                 and commit the new results/*.json
#
# Arguments: the plan, one `study:cell-glob` per run, in priority order (default: $PLAN below);
# each runs the next unfinished seed of the matching cells (`study.py --only GLOB --max_runs 1`),
# so a glob may repeat; `study:cell-glob:N` runs all their unfinished seeds, N at once
# (`--jobs N`, each process capped at 20 % of the GPU's memory). A run is started only if the time left (BUDGET seconds, default 520,
# from the script's start) exceeds the longest run so far; committed seeds are skipped, so a
# later call continues the plan. After every run, $OUT/results.tgz holds every result folder
# of the studies touched (one file: the device returns at most 8) and $OUT/study.log the log.
set -u
OUT=${OUT:-$PWD/device_out}
BUDGET=${BUDGET:-520}
mkdir -p "$OUT"
PLAN=("$@")
if [ ${#PLAN[@]} -eq 0 ]; then
  # Issue 25 first: the 500-iteration MTT IPC 1 confirm (pure MTT and the paper's form at
  # rho 0.3, seeds 1 and 2; a seed of the latter needs ~3.5 h on the 2-core CPU, longer than a
  # sitting; the runner rebuilds the expert set first), then MTT IPC 10 +- MIM4DD.
  # The four confirm seeds run side by side (`:4`): each is a chain of small kernels that
  # leaves the GPU mostly idle, so four processes share it (each capped at 20 % of its memory).
  PLAN=(
    "mim4dd_paper:mtt-base,mtt-paper-rho0.3:4" mim4dd_paper:experts10 "mim4dd_paper:mtt10-*" "mim4dd_paper:mtt10-*" "mim4dd_paper:mtt10-*"
    "mim4dd_paper:mtt10-*" "mim4dd_paper:mtt10-*" "mim4dd_paper:mtt10-*"
    published:dsa_ipc1 published:dm_ipc10 published:dc_ipc1 published:dm_ipc1
    "mim4dd:gpu10-*" "mim4dd:gpu10-*" "mim4dd:gpu10-*" "mim4dd:gpu10-*" "mim4dd:gpu10-*"
    "mim4dd:gpu10-*" published:dsa_ipc1 published:dm_ipc10 published:dc_ipc1 published:dm_ipc1
  )
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The loader looks for Debian's dataset-fashion-mnist folder; the carried copy stands in for it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d .data/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && ln -s "$PWD/.data/fashion-mnist" /usr/share/datasets/fashion-mnist
fi
# Seeds of one cell share their compiled programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mim4dd_jax_cache}
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/study.log"

longest=0
folders=()
for entry in "${PLAN[@]}"; do
  study=${entry%%:*}
  glob=${entry#*:}
  runs=(--max_runs 1)
  if [[ $glob == *:* ]]; then
    runs=(--jobs "${glob##*:}")
    glob=${glob%:*}
  fi
  left=$((BUDGET - SECONDS))
  if [ "$left" -le "$longest" ]; then
    echo "stop: ${left}s left, the longest run took ${longest}s" | tee -a "$OUT/study.log"
    break
  fi
  folder=benchmarks/studies/$study/results
  mkdir -p "$folder"
  [[ " ${folders[*]} " == *" $folder "* ]] || folders+=("$folder")
  start=$SECONDS
  echo "=== $(date -u +%T) $entry (${left}s left)" | tee -a "$OUT/study.log"
  XLA_PYTHON_CLIENT_MEM_FRACTION=$([ "${runs[0]}" = --jobs ] && echo 0.2 || echo 0.75) \
    timeout "$left" python3 benchmarks/study.py "benchmarks/studies/$study/study.toml" \
    --only "$glob" "${runs[@]}" 2>&1 | grep -v "^W0\|^I0" | tail -n 30 >> "$OUT/study.log"
  took=$((SECONDS - start))
  [ "$took" -gt "$longest" ] && longest=$took
  tar czf "$OUT/results.tgz.tmp" "${folders[@]}" && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  # The unfinished runs' checkpoints too, when small enough to come back (16 MiB a file): a
  # later call that carries runs/study resumes them instead of starting over.
  if [ -d runs/study ]; then
    tar czf "$OUT/runs.tgz.tmp" --exclude=tensorboard --exclude='grid_*.png' runs/study &&
      if [ "$(stat -c %s "$OUT/runs.tgz.tmp")" -lt 16000000 ]; then
        mv "$OUT/runs.tgz.tmp" "$OUT/runs.tgz"
      else rm -f "$OUT/runs.tgz.tmp"; fi
  fi
  echo "    took ${took}s" | tee -a "$OUT/study.log"
done
