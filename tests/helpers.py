"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Runs ``python run.py ARGS`` on the CPU; returns the completed process (text output)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


TINY = {
    "model.width": 8,
    "model.depth": 2,
    "distill.batch_real": 5,
    "distill.outer_loop": 2,
    "distill.inner_loop": 1,
    "distill.batch_train": 4,
    "mi.embed_dim": 16,
    "dsa.strategy": "crop_flip",  # siamese DSA still, with a smaller program to compile
}


def fake_dataset(num_classes: int = 3, per_class: int = 12, hw: int = 8):
    """num_classes classes of hw x hw x 1 gaussian images whose mean is the class index."""
    import jax
    import numpy as np

    from mim4dd_jax import data

    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    x = np.asarray(jax.random.normal(jax.random.key(42), (len(y), hw, hw, 1)))
    x = (x + y[:, None, None, None]).astype(np.float32)
    return data.Dataset(
        name="fake",
        train_images=x,
        train_labels=y,
        test_images=x,
        test_labels=y,
        num_classes=num_classes,
        mean=np.zeros(1, np.float32),
        std=np.ones(1, np.float32),
        zca=None,
    )


def tiny_config(arg: str, **overrides):
    """``config.build({"name": "fake"}, arg)`` with a tiny model and the overrides (dotted)."""
    from mim4dd_jax import config as config_lib

    c = config_lib.build({"name": "fake"}, arg)
    for dotted, value in {**TINY, **overrides}.items():
        config_lib.set_dotted(c, dotted, value)
    return c
