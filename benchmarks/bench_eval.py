"""K evaluation models in one jitted program: vmap vs lax.map (and, with ``:m``, the training
passes in chunks of m images, ``config.microbatch``; with ``@impl``, ``config.conv_impl``),
measured in the same run.

  python benchmarks/bench_eval.py [--num_models 3] [--n 100] [--epochs 10] [--repeats 3]
  python benchmarks/bench_eval.py --variants map,map:8 --num_models 5   # issue 15
  python benchmarks/bench_eval.py --variants map,map@hybrid --num_models 5 --epochs 1000 --dsa

ConvNet-3 on Fashion-MNIST-shaped random data ([n, 28, 28, 1], 10 classes), the evaluation
optimiser, test on 1000 images. The two variants alternate, so machine noise hits both alike;
the ratio is the figure to read. Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import append_section  # noqa: E402
from mim4dd_jax import config, evaluate, inner, models  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num_models", type=int, default=3)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dsa", action="store_true", help="train with the evaluation's DSA")
    p.add_argument(
        "--variants", default="vmap,map", help="parallel[:microbatch][@conv_impl], comma-separated"
    )
    args = p.parse_args()
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (args.n, 28, 28, 1))
    y = jnp.arange(args.n) % 10
    xt = jax.random.normal(k2, (1000, 28, 28, 1))
    yt = jnp.arange(1000) % 10
    keys = jax.random.split(jax.random.key(1), args.num_models)
    cfg = inner.TrainConfig(epochs=args.epochs)
    augment = evaluate.dsa_augment_fn(config.DSA_STRATEGY, "fashion_mnist") if args.dsa else None

    def run(variant: str) -> jax.Array:
        variant, _, impl = variant.partition("@")
        parallel, _, chunk = variant.partition(":")
        model = models.get_model(
            "convnet", num_classes=10, microbatch=int(chunk or 0), conv_impl=impl or "auto"
        )
        return inner.train_and_test_many(
            keys, x, y, 0.01, xt, yt, model=model, config=cfg, parallel=parallel, augment=augment
        )

    variants = args.variants.split(",")
    compile_s, times = {}, {v: [] for v in variants}
    for variant in variants:
        t0 = time.perf_counter()
        jax.block_until_ready(run(variant))
        compile_s[variant] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for variant in times:
            t0 = time.perf_counter()
            jax.block_until_ready(run(variant))
            times[variant].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    steps = (args.epochs + 1) * -(-args.n // min(256, args.n))
    rows = [f"| {k} | {compile_s[k]:.1f} | {med[k]:.2f} | {med[k] / steps:.3f} |" for k in variants]
    first = variants[0]
    ratios = ", ".join(f"{k} / {first}: **{med[k] / med[first]:.2f}**" for k in variants[1:])
    dsa = ", DSA" if args.dsa else ""
    body = (
        f"{args.num_models} ConvNet-3 models, {args.n} training images, {args.epochs} epochs "
        f"({steps} SGD steps each{dsa}) + test on 1000 images; median of {args.repeats}, "
        "alternating.\n\n| parallel[:microbatch][@conv_impl] | first call incl. compile (s) | "
        "median (s) | s per step (all models) |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nTime ratios: {ratios} (below 1: faster than the first)."
    )
    append_section(f"Evaluation: K models, {' vs '.join(variants)}", body)


if __name__ == "__main__":
    main()
