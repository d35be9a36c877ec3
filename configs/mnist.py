"""MNIST (28x28 grey, 10 classes) via tensorflow-datasets (needs internet for the first download).

  python run.py --config=configs/mnist.py:dsa,ipc10 --workdir=runs/mnist_dsa_ipc10

Expected (ConvNet-3; published): random IPC 1/10/50: 64.9 / 95.1 / 97.9, herding: 89.2 / 93.7 /
94.8, dc: 91.7 / 97.4 / 98.8 (DC paper), dsa: 88.7 / 97.8 / 99.2 (DSA paper).

Run locally: append ",local".
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "mnist"}

# No published MTT setting for MNIST: the Fashion-MNIST rows (CIFAR-10's, unwhitened).
HPARAMS: dict = {
    ("mtt", 1): cfg.mtt_hparams(50, 2, 2, 100.0, 1e-7),
    ("mtt", 10): cfg.mtt_hparams(30, 2, 20, 100.0, 1e-5),
    ("mtt", 50): cfg.mtt_hparams(30, 2, 40, 100.0, 1e-5),
}

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 1000}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
