"""The scripts in examples/ run on tiny shapes, and the DM + MIM4DD loop written only against the
public API (examples/dm_mim4dd.py: no config, no StepContext) is run.py's DM + MI step."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from helpers import ROOT, fake_dataset, tiny_config

from mim4dd_jax import data, models, state, steps

C, IPC = 3, 2


def _example(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mi_bound_example():
    out = _example("mi_bound").main(n_real=12, ipc=1, classes=4, width=8)
    assert out["mi"].shape == (3,) and np.isfinite(float(out["loss"]))
    assert 0 <= float(out["infonce"]) <= np.log(12) + 1e-5  # the bound's ceiling, log N
    assert out["g_syn"].shape == (4, 32, 32, 3) and float(jnp.abs(out["g_syn"]).max()) > 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(out["g_heads"])) > 0


def test_train_eval_seeds_example():
    acc = _example("train_eval_seeds").main(
        seeds=2, steps=3, ipc=2, width=8, classes=3, per_class=4, hw=8
    )
    assert acc.shape == (2,) and np.all((acc >= 0) & (acc <= 1))


def test_the_public_dm_mim4dd_loop_is_run_py_s_dm_mi_step():
    rho, iterations, key = 0.3, 2, jax.random.key(7)
    ds = fake_dataset(C, 12, 8)
    config = tiny_config(f"dm,ipc{IPC}", **{"mi.weight": rho, "mi.weight_mode": "relative"})
    # run.py's path: init_state, then make_step with the keys distill.run would pass here.
    st = state.init_state(key, ds, config)
    step = steps.make_step(config, ds)
    real, index = jnp.asarray(ds.train_images), data.class_index(ds.train_labels, C)
    for it in range(iterations):
        st, _ = step(st, jax.random.fold_in(key, 100 + it), real, index)
    # The same numbers from the example's loop, given plain values (those of the tiny config).
    model = models.ConvNet(num_classes=C, width=8, depth=2)
    images, heads, metrics = _example("dm_mim4dd").distill(
        key, ds, model, ipc=IPC, iterations=iterations, n_real=5, rho=rho, strategy="crop_flip",
        embed_dim=16,
    )  # fmt: skip
    np.testing.assert_allclose(images, st["images"], rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(heads.params), jax.tree.leaves(st["heads"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    moved = np.abs(np.asarray(images) - np.asarray(state.init_state(key, ds, config)["images"]))
    assert moved.max() > 1e-3  # not vacuous: two steps moved the images
    assert float(metrics["lambda"]) > 0 and metrics["mi"].shape == (2,)
