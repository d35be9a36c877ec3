"""Entry point: python run.py --config=configs/fashion_mnist.py:random,ipc10 --workdir=runs/x"""

from mim4dd_jax.cli import run

if __name__ == "__main__":
    run()
