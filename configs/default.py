"""The default job that `make distill` runs: Fashion-MNIST, IPC 10, ConvNet-3.

  python run.py --config=configs/default.py --workdir=runs/default

Until DM+MI is validated against the published protocol, this is the random-real coreset baseline
plus the standard evaluation (3 ConvNet-3 models, 300 epochs): expect 71-74% test accuracy depending
on the random draw (published random IPC 10: 73.8%; measured: BENCHMARKS.md), in about 10 minutes on
a 2-core CPU.
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "fashion_mnist"}


def get_config(arg: str = ""):
    c = cfg.build(DATASET, arg or "random,ipc10")
    c.eval.num_models = 3
    return c
