"""CIFAR-100 (32x32 RGB, 100 classes) via tensorflow-datasets (needs internet the first time).

  python run.py --config=configs/cifar100.py:dm,ipc10 --workdir=runs/cifar100_dm_ipc10

Expected (ConvNet-3; published): random IPC 1/10/50: 4.2 / 14.6 / 30.0, herding: 8.4 / 17.3 /
33.7; dc: 12.8 / 25.2 / -; dsa: 13.9 / 32.3 / 42.8; dm: 11.4 / 29.7 / 43.6; mtt: 24.3 / 40.1 /
47.7.

Run locally: append ",local".
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "cifar100", "source": "tfds"}

# MTT: the reference's CIFAR-100 settings (syn_steps, expert_epochs, max_start_epoch, lr_img,
# lr_lr, lr_teacher, zca; IPC 50 unrolls on minibatches of 125).
HPARAMS: dict = {
    ("mtt", 1): cfg.mtt_hparams(20, 3, 20, 1000.0, 1e-5, 0.01, zca=True),
    ("mtt", 10): cfg.mtt_hparams(20, 2, 20, 1000.0, 1e-5, 0.01, zca=False),
    ("mtt", 50): cfg.mtt_hparams(80, 2, 40, 1000.0, 1e-5, 0.01, zca=True, batch_syn=125),
}

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 20}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
