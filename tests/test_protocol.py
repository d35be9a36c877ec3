"""The evaluation and distillation protocol against the reference code (issue 12, section 3).

Each test pins one fact of a reference implementation (mtt-distillation, DatasetCondensation,
kornia) that our defaults or configs must reproduce.
"""

import hashlib
import importlib.util
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, cli_command, cli_env, fake_dataset, tiny_config
from jax.flatten_util import ravel_pytree

from mim4dd_jax import config as config_lib
from mim4dd_jax import data, evaluate, inner, models, objectives
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# ZCA: fitted on [0, 1] pixels with kornia's eps added to the eigenvalues.
# ----------------------------------------------------------------------------------------------


def _tiny_uint8_splits(n_train=60, n_test=12, hw=3, channels=2):
    """Random uint8 images with correlated pixels (a rank-3 mix plus noise), 3 classes."""
    rng = np.random.default_rng(0)
    d = hw * hw * channels
    mixing = rng.normal(size=(3, d)) * 40

    def draw(n):
        x = rng.normal(size=(n, 3)) @ mixing + rng.normal(size=(n, d)) * 8 + 128
        return np.clip(x, 0, 255).astype(np.uint8).reshape(n, hw, hw, channels)

    x_train, x_test = draw(n_train), draw(n_test)
    return x_train, np.arange(n_train) % 3, x_test, np.arange(n_test) % 3


def _kornia_zca(pixels, eps):
    """kornia.enhance.ZCAWhitening(eps) by hand on [N, ...] images: the flattened mean, the
    unbiased covariance, W = U diag(1 / sqrt(S + eps)) U^T, x_white = (x - mean) W."""
    x = pixels.reshape(len(pixels), -1).astype(np.float64)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)
    u, s, _ = np.linalg.svd(cov)
    w = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
    return mean, w


@pytest.fixture()
def tiny_npz(tmp_path):
    x_train, y_train, x_test, y_test = _tiny_uint8_splits()
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path), x_train, x_test


def test_zca_matches_kornia_fitted_on_unit_pixels(tiny_npz, tmp_path):
    path, x_train, x_test = tiny_npz
    reg = config_lib.build({"name": "tiny"}, "random").data.zca_reg
    assert reg == 0.1  # the reference's ZCAWhitening(eps=0.1)
    ds = data.load_dataset("tiny", path=path, zca=True, zca_reg=reg, cache_dir=str(tmp_path))
    mean, w = _kornia_zca(x_train / 255.0, reg)
    for images, raw in ((ds.train_images, x_train), (ds.test_images, x_test)):
        expected = ((raw.reshape(len(raw), -1) / 255.0 - mean) @ w).reshape(raw.shape)
        np.testing.assert_allclose(images, expected, atol=2e-4)
    # The per-channel normalisation is not applied before the ZCA (the reference skips it).
    normalised_fit = data.fit_zca(
        (x_train / 255.0 - ds.mean) / ds.std, reg
    )  # the old space gives other images
    assert not np.allclose(normalised_fit.whiten, ds.zca.whiten, atol=1e-2)
    # to_pixels / from_pixels stay exact inverses and land on the [0, 1] pixels.
    np.testing.assert_allclose(ds.to_pixels(ds.train_images), x_train / 255.0, atol=2e-5)
    pixels = np.random.default_rng(1).uniform(size=(4, *ds.image_shape)).astype(np.float32)
    np.testing.assert_allclose(ds.to_pixels(ds.from_pixels(pixels)), pixels, atol=2e-5)
    np.testing.assert_allclose(
        ds.from_pixels(ds.to_pixels(ds.train_images)), ds.train_images, atol=2e-4
    )


def test_zca_whitened_covariance_eigenvalues_are_s_over_s_plus_reg(tiny_npz):
    path, x_train, _ = tiny_npz
    reg = config_lib.build({"name": "tiny"}, "random").data.zca_reg
    ds = data.load_dataset("tiny", path=path, zca=True, zca_reg=reg)
    pixels = (x_train / 255.0).reshape(len(x_train), -1)
    s = np.linalg.eigvalsh(np.cov(pixels, rowvar=False))
    assert s.min() < reg < s.max()  # the regulariser matters for some directions, not all
    white = ds.train_images.reshape(len(x_train), -1).astype(np.float64)
    got = np.linalg.eigvalsh(np.cov(white, rowvar=False))
    np.testing.assert_allclose(np.sort(got), np.sort(s / (s + reg)), atol=2e-5)


def test_zca_cache_key_holds_reg_and_space(tiny_npz, tmp_path):
    path, *_ = tiny_npz
    plain = data.load_dataset("tiny", path=path)
    cache = tmp_path / "cache"
    a = data.whiten(plain, 0.1, str(cache))
    b = data.whiten(plain, 0.01, str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(f.startswith(f"zca_{data.ZCA_SPACE}_") for f in files)
    assert not np.allclose(a.train_images, b.train_images, atol=1e-3)
    # Read back from the cache: the same whitening, no new file.
    again = data.whiten(plain, 0.1, str(cache))
    np.testing.assert_array_equal(again.zca.whiten, a.zca.whiten)
    assert sorted(os.listdir(cache)) == files
    # A cache written by the old key (hash of the normalised images and reg) is never read.
    digest = hashlib.sha1(np.ascontiguousarray(plain.train_images).tobytes())
    digest.update(repr(0.1).encode())
    old = tmp_path / "old"
    old.mkdir()
    d = a.zca.mean.shape[0]
    np.savez(
        old / f"zca_{digest.hexdigest()[:16]}.npz",
        mean=np.zeros(d, np.float32),
        whiten=np.zeros((d, d), np.float32),
        unwhiten=np.zeros((d, d), np.float32),
        reg=0.1,
    )
    fresh = data.whiten(plain, 0.1, str(old))
    np.testing.assert_allclose(fresh.train_images, a.train_images, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# MTT's learned lr: the reference's SGD(lr_lr, momentum 0.5) on the lr itself.
# ----------------------------------------------------------------------------------------------

C, IPC, HW = 3, 2, 8
KEY = jax.random.key(0)
MTT = {
    "mtt.syn_steps": 3,
    "mtt.expert_epochs": 1,
    "mtt.max_start_epoch": 2,
    "mtt.batch_syn": 4,
    "distill.dsa": False,  # a smaller program; DSA in the student is tested in test_steps_mtt
    "mtt.remat": "off",
}


class _TinyMTT:
    """A fake dataset, random-walk expert trajectories [2, 4, P] and the MTT loss written out
    with the key layout that distill documents (pairs from fold_in(key, 0), the unroll from
    fold_in(key, 1))."""

    def __init__(self):
        self.dataset = fake_dataset(C, 12, HW)
        self.config = tiny_config(f"mtt,ipc{IPC}", **MTT)
        self.model = models.build_model(self.config, C)
        variables = inner.init_variables(self.model, jax.random.key(1), (HW, HW, 1))
        p0, self.unravel = ravel_pytree(variables["params"])
        walk = 0.01 * jax.random.normal(jax.random.key(2), (2, 3, p0.size))
        first = jnp.broadcast_to(p0, (2, 1, p0.size))
        self.trajectories = jnp.concatenate([first, p0 + jnp.cumsum(walk, axis=1)], axis=1)
        # One program for every lr_grad call (the calls differ only in their inputs).
        self._lr_grad = jax.jit(jax.grad(self._loss))

    def _loss(self, lr, images, start, target, unroll_key):
        final = objectives.student_unroll(
            start,
            images,
            objectives.class_labels(C, IPC),
            lr,
            jax.random.split(unroll_key, 1)[0],
            model=self.model,
            syn_steps=3,
            batch_syn=4,
        )
        return objectives.mtt_loss(final, start, target)

    def lr_grad(self, images, lr, key):
        """d loss / d lr of one MTT step at (images, lr) for step key ``key``."""
        pair_key, unroll_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
        e = jax.random.randint(jax.random.fold_in(pair_key, 0), (1,), 0, 2)[0]
        t = jax.random.randint(jax.random.fold_in(pair_key, 1), (1,), 0, 2)[0]
        start = self.unravel(self.trajectories[e, t])
        target = self.unravel(self.trajectories[e, t + 1])
        grad = self._lr_grad(jnp.float32(lr), jnp.asarray(images), start, target, unroll_key)
        return float(grad)

    def step(self, config):
        step = steps_lib.make_step(config, self.dataset)
        real = jnp.asarray(self.dataset.train_images)
        index = data.class_index(self.dataset.train_labels, C)
        return lambda state, key: step(state, key, real, index, self.trajectories)


def test_mtt_lr_follows_reference_sgd_momentum_at_twice_the_initial_lr():
    tiny = _TinyMTT()
    alpha0 = tiny.config.mtt.lr_teacher
    alpha = 2 * alpha0  # where a step on log(lr) scaled for alpha0 would be 4x too large
    keys = [jax.random.fold_in(KEY, 100 + i) for i in range(2)]
    state = state_lib.init_state(jax.random.fold_in(KEY, 0), tiny.dataset, tiny.config)
    np.testing.assert_allclose(state["syn_lr"], alpha0, rtol=1e-7)
    state["syn_lr"] = jnp.float32(alpha)
    images0 = np.array(state["images"])
    g1 = tiny.lr_grad(images0, alpha, keys[0])
    # lr_lr sized so that the first step moves the lr by 10%: the step size is then far above
    # float rounding.
    lr_lr = 0.1 * alpha / abs(g1)
    config = tiny_config(f"mtt,ipc{IPC}", **MTT, **{"mtt.lr_lr": lr_lr})
    step = tiny.step(config)

    # torch.optim.SGD([syn_lr], lr=lr_lr, momentum=0.5), written out: buf = g; then
    # buf = 0.5 * buf + g; syn_lr -= lr_lr * buf.
    state, metrics = step(state, keys[0])
    assert int(metrics["skipped"]) == 0
    np.testing.assert_allclose(metrics["syn_lr"], alpha, rtol=1e-7)  # the lr the student used
    buf = g1
    expected = alpha - lr_lr * buf
    np.testing.assert_allclose(state["syn_lr"], expected, rtol=1e-5)
    images1, lr1 = np.array(state["images"]), float(state["syn_lr"])
    g2 = tiny.lr_grad(images1, lr1, keys[1])
    state, metrics = step(state, keys[1])
    assert int(metrics["skipped"]) == 0
    buf = 0.5 * buf + g2
    expected = expected - lr_lr * buf
    np.testing.assert_allclose(state["syn_lr"], expected, rtol=1e-5)
    assert state_lib.student_lr(state, config) == pytest.approx(expected, rel=1e-5)

    # A step that would take the lr to <= 0 (the reference would go on with it) is rejected:
    # the state is kept and the step counts as skipped. Here a large momentum buffer does it.
    before = jax.tree.map(np.array, state)
    lr2 = float(before["syn_lr"])
    state["opt_state"]["syn_lr"] = jax.tree.map(
        lambda b: jnp.full_like(b, 4 * lr2 / lr_lr), state["opt_state"]["syn_lr"]
    )
    g3 = tiny.lr_grad(before["images"], lr2, keys[0])
    assert np.isfinite(g3) and lr2 - lr_lr * (0.5 * 4 * lr2 / lr_lr + g3) < 0
    state, metrics = step(state, keys[0])
    assert int(metrics["skipped"]) == 1 and np.isfinite(float(metrics["loss"]))
    assert float(state["syn_lr"]) == lr2
    np.testing.assert_array_equal(state["images"], before["images"])


# ----------------------------------------------------------------------------------------------
# Config rows.
# ----------------------------------------------------------------------------------------------


def _config_file(name, arg):
    """``configs/<name>.py:get_config(arg)``, as run.py loads it."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# The author-provided MTT table for CIFAR-10 (text copy: justincui03/dc_benchmark
# methods/tm/readme.md): ipc -> (syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr,
# lr_teacher, zca).
CIFAR10_MTT = {
    1: (50, 2, 2, 100.0, 1e-7, 0.01, True),
    10: (30, 2, 20, 100.0, 1e-5, 0.001, True),
    50: (30, 2, 40, 1000.0, 1e-5, 0.001, False),
}


@pytest.mark.parametrize("ipc", sorted(CIFAR10_MTT))
def test_cifar10_mtt_rows_are_the_author_table(ipc):
    c = _config_file("cifar10", f"mtt,ipc{ipc}")
    got = (
        c.mtt.syn_steps,
        c.mtt.expert_epochs,
        c.mtt.max_start_epoch,
        c.distill.lr,
        c.mtt.lr_lr,
        c.mtt.lr_teacher,
        c.data.zca,
    )
    assert got == CIFAR10_MTT[ipc]
    assert c.mtt.batch_syn == 0  # the table sets none: every image in every student step
    assert c.data.zca_reg == 0.1 and c.distill.momentum == 0.5


# ----------------------------------------------------------------------------------------------
# Matmul precision: full float32 by default around every run.
# ----------------------------------------------------------------------------------------------


def test_precision_choice_is_validated():
    c = config_lib.build({"name": "fake"}, "dm,ipc1")
    assert c.precision == "float32"
    config_lib.validate(c)
    c.precision = "tf32"
    with pytest.raises(ConfigError) as info:
        config_lib.validate(c)
    message = str(info.value)
    assert "\n" not in message and "'tf32'" in message
    assert all(repr(p) in message for p in config_lib.PRECISIONS)


# Runs run.py's entry point with the "distill" mode replaced by a probe that records the matmul
# precision in force and whether a jitted float32 matmul lowers with HIGHEST precision.
_PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
from mim4dd_jax import cli

def probe(config, workdir):
    x = jnp.ones((4, 4), jnp.float32)
    hlo = jax.jit(lambda a, b: a @ b).lower(x, x).as_text().lower()
    os.makedirs(workdir)
    with open(os.path.join(workdir, "seen.json"), "w") as f:
        json.dump({"value": jax.config.jax_default_matmul_precision,
                   "highest": "highest" in hlo}, f)

cli.MODES["distill"] = probe
sys.argv = ["run.py", *sys.argv[1:]]
cli.run()
"""


@pytest.mark.parametrize("precision", ["float32", "default"])
def test_cli_runs_the_mode_under_the_configured_precision(tmp_path, precision):
    workdir = tmp_path / "run"
    r = subprocess.run(
        [
            *cli_command()[:1],
            "-c",
            _PROBE,
            "--config=configs/fashion_mnist.py:dm,ipc1",
            f"--config.precision={precision}",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads((workdir / "seen.json").read_text())
    assert seen["value"] == precision
    # "float32" is HIGHEST on every dot (no TF32 on GPU); "default" leaves the backend's choice.
    assert seen["highest"] == (precision == "float32")
    # Outside a run nothing is set.
    assert jax.config.jax_default_matmul_precision is None


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_mnist_dc_evaluates_with_crop_scale_rotate_for_1000_epochs(ipc):
    # DatasetCondensation get_daparam: MNIST -> strategy crop_scale_rotate; main.py then trains
    # the evaluation models 1000 epochs (300 without augmentation).
    c = _config_file("mnist", f"dc,ipc{ipc}")
    assert c.eval.dsa and c.eval.epochs == 1000
    strategy = evaluate.dsa_augment_fn(c.dsa.strategy, c.data.name).keywords["strategy"]
    assert strategy == "crop_scale_rotate"
    assert not c.distill.dsa  # DC's matching itself is unaugmented
    # Only MNIST: DC elsewhere evaluates 300 epochs without augmentation; DSA on MNIST keeps
    # its own protocol.
    other = _config_file("fashion_mnist", f"dc,ipc{ipc}")
    assert not other.eval.dsa and other.eval.epochs == 300
    dsa = _config_file("mnist", f"dsa,ipc{ipc}")
    assert dsa.dsa.strategy == config_lib.DSA_STRATEGY and dsa.eval.epochs == 1000
