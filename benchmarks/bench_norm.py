"""Instance norm on ConvNet activations: flax GroupNorm(group_size=1) vs models.InstanceNorm.

  python benchmarks/bench_norm.py [--batch 2560,100] [--reps 5]

Both compute torch GroupNorm(C, C) with a two-pass (centred) variance; ours writes the variance
as a contraction of the centred map with itself (``einsum("nhwc,nhwc->nc")``), which XLA:CPU
lowers to a GEMM-like kernel instead of its broadcast-reduce loop. Shapes: [N, 32, 32, 128]
(after the first conv) and [N, 16, 16, 128]; N = 2560 is DM's real batch (10 classes x 256),
100 the MTT student's. Ops: forward, and forward + input gradient (of sum(y * cot)); each the
median of ``--reps`` calls after compile, the two variants alternating so that machine noise
hits both. The outputs are checked equal (max abs difference printed). Appends a table to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import append_section  # noqa: E402
from mim4dd_jax import models  # noqa: E402

VARIANTS = {
    "flax GroupNorm": nn.GroupNorm(
        num_groups=None, group_size=1, epsilon=1e-5, use_fast_variance=False
    ),
    "models.InstanceNorm": models.InstanceNorm(),
}


def _programs(module: nn.Module, x: jax.Array):
    variables = module.init(jax.random.key(0), x[:1])
    cot = jax.random.normal(jax.random.key(1), x.shape)
    fwd = jax.jit(lambda x: module.apply(variables, x))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(module.apply(variables, x) * cot)))
    return fwd, grad


def _median_ms(fn, x: jax.Array, reps: int) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="2560,100")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    rows = []
    for n in [int(b) for b in args.batch.split(",")]:
        for hw in (32, 16):
            x = jax.random.normal(jax.random.key(2), (n, hw, hw, 128)) * 2.0 + 1.0
            progs = {name: _programs(m, x) for name, m in VARIANTS.items()}
            outs = [fwd(x) for fwd, _ in progs.values()]
            diff = float(jnp.max(jnp.abs(outs[0] - outs[1])))
            for op, i in (("fwd", 0), ("fwd+grad", 1)):
                ms = {name: _median_ms(pr[i], x, args.reps) for name, pr in progs.items()}
                a, b = ms.values()
                rows.append(
                    f"| [{n}, {hw}, {hw}, 128] | {op} | {a:.1f} | {b:.1f} | {a / b:.2f} | {diff:.1e} |"
                )
                print(rows[-1], flush=True)
    header = (
        "| input | op | flax GroupNorm ms | models.InstanceNorm ms | ratio | max abs diff |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    body = (
        "Median ms per call after compile (variants alternate).\n\n"
        + header
        + "\n"
        + "\n".join(rows)
    )
    print(header)
    if not args.no_append:
        append_section("Instance norm: flax GroupNorm vs models.InstanceNorm (issue 5)", body)


if __name__ == "__main__":
    main()
