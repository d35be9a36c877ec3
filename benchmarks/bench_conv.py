"""conv2d implementations on the ConvNet's layer shapes: forward, forward+backward, grad-of-grad,
in a plain jitted function and inside a ``lax.scan`` body (issue 5).

    .venv/bin/python benchmarks/bench_conv.py [--batch 256] [--scan_batch 32] [--reps 3]

Layers (NHWC, batch N): 1 -> 128 channels at 28x28 with padding 3 (the Fashion-MNIST first conv),
128 -> 128 at 16x16 and at 8x8 with padding 1 (the second and third convs of ConvNet-3 on both
28x28x1 and 32x32x3 input). Ops: "fwd" = y = conv(x, k); "fwd+bwd" = gradients of
sum(y * cot) w.r.t. x and k; "2nd" = gradients w.r.t. x and k of a function of both first
derivatives (what DC's gradient matching and MTT's unrolled student need). Analytic FLOPs: fwd
2*MACs; fwd+bwd 2x (input gradient + weight gradient; y itself is not needed); 2nd 4x. Each time is
the best of ``--reps`` calls after compile; GFLOP/s is reported with the sgemm peak (best float32
2048^3 ``jnp.dot``) measured in the same run, so the ratios are comparable across noisy runs.
"In scan" runs the op in a 2-trip ``lax.scan`` whose carry feeds the input (so nothing is hoisted)
on ``--scan_batch`` images, and reports per-trip time: XLA:CPU's convolution has a >100x cliff
there (jax-ml/jax#12868), which is why the library's CPU default is im2col.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.bench_step import sgemm_peak  # noqa: E402
from benchmarks.common import append_section  # noqa: E402
from mim4dd_jax import conv  # noqa: E402

LAYERS = {
    "1->128 28x28 pad3": (28, 1, 3),
    "128->128 16x16 pad1": (16, 128, 1),
    "128->128 8x8 pad1": (8, 128, 1),
}
# With a fixed cotangent, sum(y * cot) needs no forward: its gradients are the input-gradient
# and the weight-gradient products (2x fwd). The "2nd" function's gradients add one product each
# (d|gx|^2/dk and d|gk|^2/dx; the others are zero and pruned): 4x fwd.
FACTOR = {"fwd": 1, "fwd+bwd": 2, "2nd": 4}


def make_op(op: str, impl: str, pad: int):
    f = functools.partial(conv.conv2d, padding=pad, impl=impl)
    if op == "fwd":
        return lambda x, k, cot: f(x, k)
    grad = jax.grad(lambda x, k, cot: jnp.sum(f(x, k) * cot), argnums=(0, 1))
    if op == "fwd+bwd":
        return grad

    def second(x, k, cot):
        def inner(x, k):
            gx, gk = grad(x, k, cot)
            return jnp.sum(gx * gx) + jnp.sum(gk * gk)

        return jax.grad(inner, argnums=(0, 1))(x, k)

    return second


def in_scan(fn):
    def run(x, k, cot):
        def body(c, _):
            out = fn(x + c, k, cot)
            # Every output feeds the carry, so XLA cannot prune any of them.
            return c + 1e-6 * sum(jnp.mean(o) for o in jax.tree.leaves(out)), None

        c, _ = lax.scan(body, jnp.zeros((), x.dtype), None, length=2)
        return c

    return run


def best_time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--scan_batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--impls", default="xla,im2col,hybrid")
    p.add_argument("--ops", default="fwd,fwd+bwd,2nd")
    p.add_argument("--contexts", default="jit,scan", help="jit and/or scan")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    impls = args.impls.split(",")
    peak = sgemm_peak() / 1e9
    print(f"sgemm peak {peak:.1f} GFLOP/s", flush=True)
    header = "| layer | op | context | N | " + " | ".join(
        f"{i} ms (GFLOP/s, % peak)" for i in impls
    )
    header += " |\n|---|---|---|---:|" + "---:|" * len(impls)
    rows = []
    sizes = {"jit": args.batch, "scan": args.scan_batch}
    contexts = [(c, sizes[c]) for c in args.contexts.split(",")]
    for (name, (hw, cin, pad)), op, (ctx, n) in (
        (a, b, c) for a in LAYERS.items() for b in args.ops.split(",") for c in contexts
    ):
        kx, kk, kc = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (n, hw, hw, cin))
        k = jax.random.normal(kk, (3, 3, cin, 128)) * 0.05
        ho = hw + 2 * pad - 2
        cot = jax.random.normal(kc, (n, ho, ho, 128))
        flops = 2.0 * n * ho * ho * 9 * cin * 128 * FACTOR[op]
        cells = []
        for impl in impls:
            fn = make_op(op, impl, pad)
            fn = jax.jit(in_scan(fn) if ctx == "scan" else fn)
            t = best_time(fn, (x, k, cot), args.reps if ctx == "jit" else 1)
            t = t / 2 if ctx == "scan" else t
            gf = flops / t / 1e9
            cells.append(f"{1e3 * t:.1f} ({gf:.0f}, {100 * gf / peak:.0f}%)")
        rows.append(f"| {name} | {op} | {ctx} | {n} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    body = (
        f"sgemm peak measured in this run: {peak:.1f} GFLOP/s (float32 2048^3 jnp.dot, best of "
        f"5). Best of {args.reps} calls (scan: 1 call of 2 trips, per-trip time).\n\n"
        + header
        + "\n"
        + "\n".join(rows)
    )
    if not args.no_append:
        append_section("conv2d implementations on ConvNet layer shapes (issue 5)", body)


if __name__ == "__main__":
    main()
