"""MNIST (28x28 grey, 10 classes) via tensorflow-datasets (needs internet for the first download).

  python run.py --config=configs/mnist.py:dsa,ipc10 --workdir=runs/mnist_dsa_ipc10

Expected (ConvNet-3; published): random IPC 1/10/50: 64.9 / 95.1 / 97.9, herding: 89.2 / 93.7 /
94.8, dc: 91.7 / 97.4 / 98.8 (DC paper), dsa: 88.7 / 97.8 / 99.2 (DSA paper).

Run locally: append ",local".
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "mnist"}

# No published MTT setting for MNIST: the Fashion-MNIST rows (CIFAR-10's, unwhitened).
HPARAMS: dict = cfg.mtt_fallback_hparams()

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 1000}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
