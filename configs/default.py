"""The default job that `make distill` runs: DM + the MIM4DD term on Fashion-MNIST, IPC 10.

  python run.py --config=configs/default.py --workdir=runs/default

A CPU-sized budget: 100 DM iterations with 64 real images per class and mi.weight 0.1, then the
standard evaluation (ConvNet-3 trained 300 epochs without augmentation, here 2 models). On a
2-core CPU it took 6 min 44 s and reached 78.40 ± 0.24% test accuracy, against 73.21 ± 0.36% for
10 random real images per class under the same evaluation (published random IPC 10: 73.8%). The
published DM protocol (20k iterations, 256 real images per class, 1000-epoch DSA evaluation) is
``configs/fashion_mnist.py:dm,ipc10``. Measured numbers and commands: BENCHMARKS.md.
"""

from mim4dd_jax import config as cfg

DATASET = {"name": "fashion_mnist"}

JOB = {
    "mi.weight": 0.1,
    "distill.iterations": 100,
    "distill.batch_real": 64,
    "distill.eval_every": 0,
    "distill.checkpoint_every": 50,
    "eval.dsa": False,
    "eval.epochs": 300,
    "eval.num_models": 2,
}


def get_config(arg: str = ""):
    c = cfg.build(DATASET, arg or "dm,ipc10")
    for dotted, value in JOB.items():
        cfg.set_dotted(c, dotted, value)
    return c
