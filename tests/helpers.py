"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_command(*args: str) -> list[str]:
    """``python run.py ARGS`` as an argv list (run it with :func:`cli_env`, in ROOT)."""
    return [sys.executable, os.path.join(ROOT, "run.py"), *args]


def cli_env() -> dict[str, str]:
    """The environment the CLI tests run in: the CPU backend, quiet TensorFlow."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def run_cli(
    *args: str, cwd: str = ROOT, prefix: tuple[str, ...] = (), **kwargs
) -> subprocess.CompletedProcess:
    """Runs ``python run.py ARGS`` on the CPU; returns the completed process (text output).
    ``prefix``: a command that wraps it (e.g. ``setpriv ... --``); ``kwargs`` go to
    ``subprocess.run`` (e.g. ``user=``)."""
    env = cli_env()
    if "user" in kwargs:
        # Another user cannot read this session's compilation cache (tests/conftest.py); jax
        # would warn about it on stderr.
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run(
        [*prefix, *cli_command(*args)],
        cwd=cwd,
        env=env,
        **kwargs,
        capture_output=True,
        text=True,
        timeout=600,
    )


# For tests about the loop, the runner or the guard, which do not depend on the network: a
# one-block ConvNet with XLA's convolution (the same math as im2col, tests/test_conv.py), whose
# steps compile in about half the time.
SMALL_NET = {"model.depth": 1, "conv_impl": "xla"}

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


# A tiny MTT run (2-step unroll, learned lr and soft labels): test_distill_resume and
# test_split_bytes (which pins hashes of runs with it: change it only with them).
TINY_MTT = {
    "mtt.syn_steps": 2,
    "mtt.expert_epochs": 1,
    "mtt.max_start_epoch": 2,
    "mtt.batch_syn": 4,
    "mtt.remat": "off",
    "mtt.learn_lr": True,
    "mtt.learn_labels": True,
    "distill.lr": 10.0,
    "distill.dsa": False,  # a smaller program; the student's DSA is tested in test_steps_mtt
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


def pixel_range_forms(raw, dataset) -> dict:
    """The same uint8 images [N, H, W, C] in every form a set file may hold them, with the
    pixel_range each declares ("" = undeclared): name -> (array, declared). Evaluate mode and
    distill.init_from must read them all as one set (issue 28)."""
    import numpy as np

    as_01 = raw.astype(np.float32) / np.float32(255)
    return {
        "uint8": (raw, ""),
        "float 0..255, flag 0_255": (raw.astype(np.float32), "0_255"),
        "float 0..1": (as_01, ""),
        "float 0..1, flag 0_1": (as_01, "0_1"),
        "normalised, flag normalised": (dataset.from_pixels(as_01), "normalised"),
    }


def write_fake_npz(path, num_classes: int = 3, per_class: int = 12, hw: int = 8, scale: float = 50):
    """:func:`fake_dataset` as an npz in [0, 255] uint8 pixels (``data.source=npz``; the test
    split is the train split); returns ``str(path)``."""
    import numpy as np

    ds = fake_dataset(num_classes, per_class, hw)
    x = np.clip((ds.train_images + 1) * scale, 0, 255).astype(np.uint8)
    np.savez(path, x_train=x, y_train=ds.train_labels, x_test=x, y_test=ds.train_labels)
    return str(path)


def tiny_config(arg: str, **overrides):
    """``config.build({"name": "fake"}, arg)`` with a tiny model and the overrides (dotted)."""
    from mim4dd_jax import config as config_lib

    c = config_lib.build({"name": "fake"}, arg)
    for dotted, value in {**TINY, **overrides}.items():
        config_lib.set_dotted(c, dotted, value)
    return c


def write_mnist_folder(folder, train_per_class: int, test_per_class: int, num_classes: int = 10):
    """An MNIST-format folder of random 28x28 uint8 images (``data.path`` for run.py)."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        n = per_class * num_classes
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", np.arange(n) % num_classes),
        ):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                int(d).to_bytes(4, "big") for d in array.shape
            )
            with gzip.open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return folder


def fake_experts(config, dataset, num: int = 2, epochs: int = 2, drift: float = 0.01):
    """[num, epochs + 1, P] expert trajectories: random inits drifting ``drift`` (times a fixed
    normal direction) per epoch, so every checkpoint is a distinct network."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from mim4dd_jax import inner, models

    model = models.build_model(config, dataset.num_classes)
    out = []
    for e in range(num):
        variables = inner.init_variables(model, jax.random.key(10 + e), dataset.image_shape)
        flat = ravel_pytree(variables["params"])[0]
        step = drift * jax.random.normal(jax.random.key(20 + e), flat.shape)
        out.append(jnp.stack([flat + t * step for t in range(epochs + 1)]))
    return jnp.stack(out)
