"""Fashion-MNIST (28x28 grey, 10 classes, 6000 train images per class).

Run (data comes from Debian's dataset-fashion-mnist folder when present, else tfds):

  python run.py --config=configs/fashion_mnist.py:random,ipc10 --workdir=runs/fmnist_random_ipc10
  python run.py --config=configs/fashion_mnist.py:herding,ipc1 --workdir=runs/fmnist_herding_ipc1

Expected (ConvNet-3, 300 epochs without augmentation; published, DC paper):
  random  IPC 1/10/50: 51.4 / 73.8 / 82.5
  herding IPC 1/10/50: 67.0 / 71.1 / 71.9
Our measured numbers, with commands and machines, are in BENCHMARKS.md.

Run locally: append ",local" (2 models, 100 epochs, 1000 test images per class: a few minutes on CPU).
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "fashion_mnist"}

# Per-(method, ipc) hyperparameters, as data. Coreset baselines use the defaults.
HPARAMS: dict = {}

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 1000}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
