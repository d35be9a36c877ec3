"""Base method vs base + MIM4DD term, side by side on real Fashion-MNIST, same seeds.

Runs ``run.py`` once per (mi.weight, seed) with everything else equal, so the only difference is
the MI term (with mi.weight = 0 the base method runs exactly; tests/test_distill.py). Prints a
table of test accuracy (mean ± std over the evaluation models, per seed, and over seeds) and
appends it to BENCHMARKS.md.

  python benchmarks/bench_addon.py --method=dm --ipc=10 --iterations=150 --batch_real=64
  python benchmarks/bench_addon.py --method=dsa --ipc=1 --iterations=200 --weights=0,0.1,1

Defaults are a CPU-sized budget (150 DM iterations, 3 models trained 300 epochs without
augmentation): a first signal, not the published protocol (20k DM iterations, 1000-epoch DSA
evaluation); pass the published numbers on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import ROOT, append_section  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="dm", choices=["dm", "dc", "dsa", "mtt"])
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch_real", type=int, default=64)
    p.add_argument("--weights", default="0,0.1", help="comma-separated mi.weight values")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--eval_epochs", type=int, default=300)
    p.add_argument("--eval_dsa", action="store_true")
    p.add_argument("--num_models", type=int, default=3)
    p.add_argument("--experts_dir", default="", help="MTT only")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_addon"))
    p.add_argument("--extra", default="", help="more --config.* overrides, space-separated")
    args = p.parse_args()

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for weight in [float(w) for w in args.weights.split(",")]:
            workdir = os.path.join(args.workdir, f"{args.method}_ipc{args.ipc}_w{weight:g}_s{seed}")
            cmd = [
                sys.executable,
                os.path.join(ROOT, "run.py"),
                f"--config=configs/fashion_mnist.py:{args.method},ipc{args.ipc}",
                f"--workdir={workdir}",
                f"--config.seed={seed}",
                f"--config.mi.weight={weight}",
                f"--config.distill.iterations={args.iterations}",
                f"--config.distill.batch_real={args.batch_real}",
                "--config.distill.eval_every=0",
                f"--config.eval.epochs={args.eval_epochs}",
                f"--config.eval.dsa={args.eval_dsa}",
                f"--config.eval.num_models={args.num_models}",
                *([f"--config.mtt.experts_dir={args.experts_dir}"] if args.experts_dir else []),
                *args.extra.split(),
            ]
            subprocess.run(cmd, cwd=ROOT, check=True)
            with open(os.path.join(workdir, "results.json")) as f:
                acc = json.load(f)["accuracy"]["convnet"]
            rows.append((weight, seed, acc["mean"], acc["std"]))
            print(
                f"mi.weight={weight:g} seed={seed}: {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}"
            )

    lines = ["| mi.weight | seed | test accuracy (%) |", "|---|---|---|"]
    for weight, seed, mean, std in rows:
        lines.append(f"| {weight:g} | {seed} | {100 * mean:.2f} ± {100 * std:.2f} |")
    for weight in sorted({r[0] for r in rows}):
        means = [r[2] for r in rows if r[0] == weight]
        if len(means) > 1:
            lines.append(
                f"| {weight:g} | all | {100 * np.mean(means):.2f} ± {100 * np.std(means):.2f} |"
            )
    append_section(
        f"Base vs base + MI: {args.method} IPC {args.ipc} on Fashion-MNIST (issue 4)",
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
