"""SVHN (32x32 RGB digits, 10 classes; tfds "svhn_cropped", internet needed the first time).

  python run.py --config=configs/svhn.py:dsa,ipc10 --workdir=runs/svhn_dsa_ipc10

Expected (ConvNet-3; published): random IPC 1/10/50: 14.6 / 35.1 / 70.9, herding: 20.9 / 50.5 /
72.6, dc: 31.2 / 76.1 / 82.3 (DC paper), dsa: 27.5 / 79.2 / 84.4 (DSA paper). DSA drops "flip"
for digits.

Run locally: append ",local".
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "svhn_cropped", "source": "tfds"}

# No published MTT setting for SVHN: CIFAR-10's rows without ZCA.
HPARAMS: dict = cfg.mtt_fallback_hparams()

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 200}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
