#!/usr/bin/env bash
# Issue 5's step suite on a lent GPU machine, in one device call of under 10 minutes.
# PREPARED, NOT YET RUN ON A DEVICE: no session so far was lent one. Expect to fix small things
# on the first run.
#
#   here:         make device-carry       (ml-collections wheel -> .whl/, Fashion-MNIST -> .data/)
#   device tool:  run(command="bash benchmarks/device_suite.sh", carry=[".whl", ".data"],
#                     timeout_s=600)
#
# The machine has jax, flax, optax, chex, orbax, tensorboard, tqdm and pillow; ml-collections
# travels as a wheel, and nothing here needs tensorflow(-datasets). Writes under $OUT: gpu.txt
# (device and jax version) and steps.md (bench_step rows: s/iter, peak device memory, % of the
# float32 matmul rate that jnp.dot reaches in the same process, at JAX's default precision like
# the steps themselves). Each block has its own time limit, so one slow block cannot eat the
# rest; a block cut short keeps the rows it printed.
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} TF_CPP_MIN_LOG_LEVEL=3
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/gpu.txt" 2>&1
B="python3 benchmarks/bench_step.py --no-append --iters 5 --timeout 100"
{
  timeout 60 $B --methods net --shapes fmnist,cifar
  timeout 120 $B --methods dm --shapes fmnist --ipcs 1,10,50 --mi 0,0.1
  timeout 60 $B --methods dm --shapes cifar --ipcs 10 --mi 0,0.1
  timeout 60 $B --methods dsa --shapes fmnist --ipcs 10 --mi 0,0.1 --dc_loops 1,1
  timeout 200 $B --methods mtt --shapes fmnist --ipcs 10 --mi 0 --syn_steps 10,20,40 --remat on,off
} 2>&1 | grep -v "^W0\|^I0" | tee "$OUT/steps.md"
