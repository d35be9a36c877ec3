"""CIFAR-10 (32x32 RGB, 10 classes) via tensorflow-datasets (needs internet for the first download).

  python run.py --config=configs/cifar10.py:random,ipc10 --workdir=runs/cifar10_random_ipc10
  python run.py --config=configs/cifar10.py:experts --config.data.zca=True --workdir=runs/c10_experts
  python run.py --config=configs/cifar10.py:mtt,ipc10 --config.mtt.experts_dir=runs/c10_experts \
      --workdir=runs/cifar10_mtt_ipc10

Expected (ConvNet-3; published): random IPC 1/10/50: 14.4 / 26.0 / 43.4, herding: 21.5 / 31.6 /
40.4 (DC paper); dc: 28.3 / 44.9 / 53.9; dsa: 28.8 / 52.1 / 60.6; dm: 26.0 / 48.9 / 63.0;
mtt: 46.3 / 65.3 / 71.6 (MTT paper).

MTT experts must be trained on the same input space as the distillation (the ``data.zca`` of the
row below); ``experts.load`` refuses a mismatch.

Run locally: append ",local".
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "cifar10", "source": "tfds"}

# MTT: the reference repository's published commands (syn_steps, expert_epochs,
# max_start_epoch, lr_img, lr_lr, lr_teacher, zca).
HPARAMS: dict = {
    ("mtt", 1): cfg.mtt_hparams(50, 2, 2, 1000.0, 1e-7, 0.01, zca=True),
    ("mtt", 10): cfg.mtt_hparams(30, 2, 20, 1000.0, 1e-5, 0.01, zca=True),
    ("mtt", 50): cfg.mtt_hparams(30, 2, 40, 100.0, 1e-5, 0.01, zca=False),
}

LOCAL = {"eval.epochs": 100, "eval.num_models": 2, "data.test_per_class": 200}


def get_config(arg: str = "random,ipc10"):
    return cfg.build(DATASET, arg, hparams=HPARAMS, local=LOCAL)
