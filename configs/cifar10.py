"""CIFAR-10 (32x32 RGB, 10 classes) via tensorflow-datasets (needs internet for the first download).

  python run.py --config=configs/cifar10.py:random,ipc10 --workdir=runs/cifar10_random_ipc10

Expected (ConvNet-3, 300 epochs; published, DC paper): random IPC 1/10/50: 14.4 / 26.0 / 43.4,
herding: 21.5 / 31.6 / 40.4.

Run locally: append ",local".
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "cifar10", "source": "tfds"}

HPARAMS: dict = {}

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 200}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
