"""Random-real and herding coresets on Fashion-MNIST, evaluated with the standard protocol.

  python benchmarks/bench_coreset.py [--ipcs 1,10,50] [--num_models 3] [--epochs 300]

ConvNet-3, no augmentation. Herding uses the embedding of a ConvNet-3 trained on the whole train
split (``--feature_epochs`` of the evaluation optimiser, run once); herding is greedy and nested,
so one IPC-max selection gives every smaller IPC as its prefix. Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import append_lines, append_section  # noqa: E402
from mim4dd_jax import config as config_lib  # noqa: E402
from mim4dd_jax import coreset, data, evaluate, inner, models  # noqa: E402

PUBLISHED = {"random": {1: 51.4, 10: 73.8, 50: 82.5}, "herding": {1: 67.0, 10: 71.1, 50: 71.9}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--methods", default="random,herding")
    p.add_argument("--num_models", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--feature_epochs", type=int, default=1)
    args = p.parse_args()
    ipcs = [int(i) for i in args.ipcs.split(",")]
    methods = args.methods.split(",")

    config = config_lib.build({"name": "fashion_mnist"}, "random,ipc1")
    config.eval.num_models = args.num_models
    config.eval.epochs = args.epochs
    config.coreset.feature_epochs = args.feature_epochs
    ds = data.load_from_config(config.data)
    index = data.class_index(ds.train_labels, ds.num_classes)
    model = models.build_model(config, ds.num_classes)
    train_config = inner.TrainConfig(epochs=args.epochs)

    header = (
        f"ConvNet-3 (width 128, instance norm), {args.epochs} epochs without augmentation, "
        f"{args.num_models} models, full 10k test split. Herding features: ConvNet-3 trained "
        f"{args.feature_epochs} epoch(s) (+1 pass, reference schedule) on all 60k train images. "
        "Rows are appended as each evaluation finishes.\n\n"
        "| method | IPC | test acc % (mean ± std) | published | wall s |\n|---|---|---|---|---|"
    )
    append_section("Coreset baselines on Fashion-MNIST (issue 2)", header)

    def run(method: str, ipc: int, chosen: np.ndarray) -> None:
        t0 = time.time()
        chosen = chosen.reshape(-1)
        [result] = evaluate.evaluate(
            jax.random.key(2),
            ds.train_images[chosen],
            ds.train_labels[chosen],
            ds.test_images,
            ds.test_labels,
            architectures=[("convnet", model)],
            num_models=args.num_models,
            train_config=train_config,
        )
        append_lines(
            f"| {method} | {ipc} | {100 * result.mean:.1f} ± {100 * result.std:.1f} | "
            f"{PUBLISHED[method][ipc]} | {time.time() - t0:.0f} |"
        )

    # Cheap rows first, so an interrupted run still reports them.
    herd = None
    for ipc in sorted(ipcs):
        if "random" in methods:
            key = jax.random.fold_in(jax.random.key(0), ipc)
            run("random", ipc, np.asarray(coreset.random_indices(key, index, ipc)))
        if "herding" in methods:
            if herd is None:
                t0 = time.time()
                feats = coreset.herding_features(jax.random.key(1), ds, config)
                herd = coreset.herding_indices(feats, index, max(ipcs))
                print(f"herding features + selection: {time.time() - t0:.0f} s", flush=True)
            run("herding", ipc, herd[:, :ipc])


if __name__ == "__main__":
    main()
