"""Distillation engine: mi.weight = 0 is the pure base method, the MI add-on acts, DM learns, the
step compiles once, run.py writes the artifacts, and a bad optimizer name is one error line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fake_dataset, run_cli, tiny_config

from mim4dd_jax import augment, data, evaluate, inner, models, objectives, steps_dc
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
C, PER_CLASS, HW, IPC = 3, 12, 8, 2
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def dataset():
    return fake_dataset(C, PER_CLASS, HW)


def make_config(method, **overrides):
    # distill.batch_train 4: the 6 synthetic images make a full and a padded batch.
    return tiny_config(f"{method},ipc{IPC}", **overrides)


def run_steps(config, dataset, n, step=None, state=None):
    """n steps from init_state(fold_in(KEY, 0)); returns (state, host metrics per step, step)."""
    state = (
        state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
        if state is None
        else state
    )
    step = steps_lib.make_step(config, dataset) if step is None else step
    real = jnp.asarray(dataset.train_images)
    index = data.class_index(dataset.train_labels, C)
    history = []
    for it in range(n):
        state, metrics = step(state, jax.random.fold_in(KEY, 100 + it), real, index)
        history.append(jax.device_get(metrics))
    return state, history, step


def host(tree):
    """A host copy (a view of a buffer that gets donated later would be unsafe)."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def heads_moved(heads, heads0):
    """Smallest max-abs change over the projection-head parameters (the critic bias of InfoNCE
    cancels in the softmax, so it has no gradient and is left out)."""
    proj = lambda hs: [h["proj"] for h in hs]
    diff = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), proj(heads), proj(heads0))
    return min(jax.tree.leaves(diff))


@pytest.fixture(scope="module")
def dm_runs(dataset):
    """DM with mi.weight 0 and > 0, 3 steps each (the step functions are reused below)."""
    base = run_steps(make_config("dm"), dataset, 3)
    cfg_mi = make_config("dm", **{"mi.weight": 0.5})
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, cfg_mi)
    heads0 = host(init["heads"])
    with_mi = run_steps(cfg_mi, dataset, 3, state=init)
    return base, with_mi, heads0


def pure_dm(dataset, config, n):
    """DM written directly from objectives + optax, with the key layout distill documents."""
    model = steps_lib.step_model(config, C)
    strategy = augment.strategy_for_dataset(config.dsa.strategy, dataset.name)
    real = jnp.asarray(dataset.train_images)
    index = data.class_index(dataset.train_labels, C)
    tx = optax.sgd(1.0, momentum=0.5)

    @jax.jit
    def one(images, opt, key):
        rk, nk, ak = (jax.random.fold_in(key, i) for i in range(3))
        real_x = real[data.sample_per_class(rk, index, 5)]
        variables = inner.init_variables(model, nk, dataset.image_shape)
        loss_fn = lambda im: objectives.dm_loss(
            variables, real_x, im.reshape(C, IPC, HW, HW, 1), ak, model=model, dsa_strategy=strategy
        )
        loss, g = jax.value_and_grad(loss_fn)(images)
        updates, opt = tx.update(g, opt, images)
        return optax.apply_updates(images, updates), opt, loss

    images = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)["images"]
    opt, losses = tx.init(images), []
    for it in range(n):
        images, opt, loss = one(images, opt, jax.random.fold_in(KEY, 100 + it))
        losses.append(float(loss))
    return np.asarray(images), losses


def test_dm_step_uses_the_hybrid_conv_on_cpu_and_loops_keep_auto():
    assert steps_lib.step_model(make_config("dm"), C).conv_impl == "hybrid"
    assert steps_lib.step_model(make_config("dsa"), C).conv_impl == "auto"
    assert steps_lib.step_model(make_config("dm", conv_impl="im2col"), C).conv_impl == "im2col"


def test_evaluation_trains_convnets_with_the_hybrid_conv_on_cpu():
    assert evaluate.eval_model(make_config("dsa"), C).conv_impl == "hybrid"
    assert evaluate.eval_model(make_config("dsa", conv_impl="im2col"), C).conv_impl == "im2col"
    # Unmeasured architectures, and models vmapped together (2.4x slower), keep the choice.
    assert evaluate.eval_model(make_config("dsa"), C, "resnet18").conv_impl == "auto"
    vmapped = make_config("dsa", **{"eval.parallel": "vmap"})
    assert evaluate.eval_model(vmapped, C).conv_impl == "auto"
    # Distillation's own model is untouched (its loops keep im2col).
    assert models.build_model(make_config("dsa"), C).conv_impl == "auto"


def test_dm_with_mi_weight_zero_is_the_pure_base_method(dataset, dm_runs):
    (state, history, _), (mi_state, mi_history, _), _ = dm_runs
    images, losses = pure_dm(dataset, make_config("dm"), 3)
    np.testing.assert_allclose([float(m["loss"]) for m in history], losses, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state["images"]), images, rtol=1e-6, atol=1e-6)
    assert "mi" not in history[0]
    # The MI term draws no random numbers: the first step's base loss (same images, network,
    # real batch and DSA) is the same with and without it; then the images differ.
    np.testing.assert_allclose(mi_history[0]["base_loss"], history[0]["base_loss"], rtol=1e-6)
    assert np.max(np.abs(np.asarray(mi_state["images"]) - images)) > 1e-4


def test_mi_heads_learn_and_the_estimate_is_finite(dm_runs):
    _, (state, history, step), heads0 = dm_runs
    for m in history:
        assert m["mi"].shape == (2,)  # one estimate per ConvNet block
        assert np.all(np.isfinite(m["mi"]))
        np.testing.assert_allclose(m["loss"], m["base_loss"] - 0.5 * np.sum(m["mi"]), rtol=1e-5)
    assert heads_moved(state["heads"], heads0) > 0  # every head parameter was updated
    assert step._cache_size() == 1  # 3 iterations, one compilation


def test_dm_steps_reduce_the_loss_on_fixed_networks(dataset, dm_runs):
    (_, _, step), _, _ = dm_runs
    config = make_config("dm", **{"distill.init": "noise"})
    model = models.build_model(config, C)
    real_x = jnp.asarray(dataset.train_images).reshape(C, PER_CLASS, HW, HW, 1)
    nets = [inner.init_variables(model, jax.random.key(7 + i), (HW, HW, 1)) for i in range(3)]

    @jax.jit
    def held_out_loss(images):
        syn = images.reshape(C, IPC, HW, HW, 1)
        return sum(objectives.dm_loss(v, real_x, syn, KEY, model=model) for v in nets)

    state = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    before = float(held_out_loss(state["images"]))
    state, _, _ = run_steps(config, dataset, 10, step=step, state=state)
    after = float(held_out_loss(state["images"]))
    assert after < 0.8 * before, (before, after)


def test_dsa_with_mi_weight_zero_keeps_the_base_streams_and_mi_changes_images(dataset):
    # outer_loop 2, inner_loop 1: image update, network training, image update per iteration.
    base, history, step = run_steps(make_config("dsa"), dataset, 2)
    assert "mi" not in history[0] and step._cache_size() == 1
    assert history[0]["base_loss_outer"].shape == (2,)
    cfg_mi = make_config("dsa", **{"mi.weight": 0.5})
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, cfg_mi)
    heads0 = host(init["heads"])
    mi_state, mi_history, _ = run_steps(cfg_mi, dataset, 2, state=init)
    # Same network, real batch and DSA views at the first outer step: the MI term drew no
    # randomness. After it the images (and so everything else) differ.
    np.testing.assert_allclose(
        mi_history[0]["base_loss_outer"][0], history[0]["base_loss_outer"][0], rtol=1e-6
    )
    assert np.all(np.isfinite(mi_history[-1]["mi"]))
    assert np.max(np.abs(np.asarray(mi_state["images"]) - np.asarray(base["images"]))) > 1e-4
    assert heads_moved(mi_state["heads"], heads0) > 0


def test_inner_loop_training_lowers_the_synthetic_cross_entropy(dataset):
    config = make_config("dc")
    model = models.build_model(config, C)
    state = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    images, labels = state["images"], state["labels"]
    variables = inner.init_variables(model, jax.random.key(3), (HW, HW, 1))
    ce = lambda v: float(jnp.mean(inner.cross_entropy(model.apply(v, images), labels)))
    trained = jax.jit(
        lambda v, k: steps_dc.train_on_synthetic(
            v, images, labels, k, model=model, epochs=10, batch_size=4, lr=0.01, strategy=None
        )
    )(variables, jax.random.key(4))
    assert ce(trained) < ce(variables)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="'bogus'.*'sgd'"):
        state_lib.make_optimizer("bogus", 0.1)


def test_cli_unknown_optimizer_gives_one_line_and_exit_code_2(tmp_path):
    workdir = tmp_path / "never"
    r = run_cli(
        "--config=configs/fashion_mnist.py:dm,ipc1",
        "--config.distill.optimizer=bogus",
        f"--workdir={workdir}",
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'bogus'" in lines[0] and "'sgd'" in lines[0], r.stderr
    assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("CI"), reason="needs dataset-fashion-mnist"
)
def test_dm_with_mi_end_to_end_on_fashion_mnist(tmp_path):
    r = run_cli(
        "--config=configs/fashion_mnist.py:dm,ipc1,local",
        f"--workdir={tmp_path}",
        "--config.mi.weight=0.1",
        "--config.mi.embed_dim=16",
        "--config.model.width=8",
        "--config.model.depth=2",
        "--config.data.train_per_class=20",
        "--config.data.test_per_class=10",
        "--config.distill.iterations=3",
        "--config.distill.batch_real=8",
        "--config.distill.eval_every=2",
        "--config.eval.epochs=2",
        "--config.dsa.strategy=crop_flip",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("distilled.npz", "grid.png", "metrics.jsonl", "results.json"):
        assert (tmp_path / name).is_file(), name
    with np.load(tmp_path / "distilled.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (10, 28, 28, 1) and labels.tolist() == list(range(10))
    # Pixel space ([0, 1] for the real images) but not clipped: clipping would change the set
    # that was evaluated. The init is real, so most pixels are still inside [0, 1].
    assert np.all(np.isfinite(images))
    assert np.mean((images >= 0) & (images <= 1)) > 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert len(row["mi"]) == 2 and np.all(np.isfinite(row["mi"])) and row["s_per_iter"] > 0
    assert [r["step"] for r in rows if "accuracy" in r] == [0, 2, 3]


def test_memory_bank_fills_and_joins_the_candidates(dataset):
    config = make_config("dm", **{"mi.weight": 0.5, "mi.bank_slots": 4})
    state, history, step = run_steps(config, dataset, 2)
    assert len(state["banks"]) == 2  # one bank per ConvNet block
    for bank in state["banks"]:
        # 5 real images per class and step went in; 4 slots per class are now full.
        np.testing.assert_array_equal(bank["filled"], np.full(C, 4))
        assert np.all(np.isfinite(bank["emb"])) and np.any(bank["emb"] != 0)
    assert all(np.all(np.isfinite(m["mi"])) and m["skipped"] == 0 for m in history)
    assert step._cache_size() == 1 and "_bank_update" not in history[0]
