"""MTT in the distillation engine: mi.weight = 0 is exactly the objective written out by hand, the
image and lr gradients are finite and nonzero, the MI add-on and soft labels learn, and a model
with batch statistics is refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fake_dataset, run_cli, tiny_config
from jax.flatten_util import ravel_pytree

from mim4dd_jax import augment, data, inner, models, objectives
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError

C, PER_CLASS, HW, IPC, EXPERTS, EPOCHS = 3, 12, 8, 2, 2, 3
KEY = jax.random.key(0)
FMNIST = "/usr/share/datasets/fashion-mnist"
MTT = {
    "mtt.syn_steps": 3,
    "mtt.expert_epochs": 1,
    "mtt.max_start_epoch": 2,
    "mtt.batch_syn": 4,
    "distill.lr": 10.0,
}


@pytest.fixture(scope="module")
def dataset():
    return fake_dataset(C, PER_CLASS, HW)


def make_config(**overrides):
    return tiny_config(f"mtt,ipc{IPC}", **{**MTT, **overrides})


@pytest.fixture(scope="module")
def trajectories(dataset):
    """[EXPERTS, EPOCHS + 1, P]: SGD epochs on the fake train split from two inits."""
    model = models.build_model(make_config(), C)
    x, y = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    out = []
    for e in range(EXPERTS):
        variables = inner.init_variables(model, jax.random.key(10 + e), (HW, HW, 1))
        rows = [ravel_pytree(variables["params"])[0]]
        for epoch in range(EPOCHS):
            variables = inner.sgd_epochs(
                jax.random.key(100 * e + epoch),
                variables,
                x,
                y,
                0.05,
                model=model,
                passes=1,
                batch_size=12,
            )
            rows.append(ravel_pytree(variables["params"])[0])
        out.append(jnp.stack(rows))
    return jnp.stack(out)


def run_steps(config, dataset, trajectories, n, state=None):
    state = (
        state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
        if state is None
        else state
    )
    step = steps_lib.make_step(config, dataset)
    real, index = jnp.asarray(dataset.train_images), data.class_index(dataset.train_labels, C)
    history = []
    for it in range(n):
        state, metrics = step(state, jax.random.fold_in(KEY, 100 + it), real, index, trajectories)
        history.append(jax.device_get(metrics))
    return state, history, step


def test_mtt_step_is_the_objective_written_out(dataset, trajectories):
    config = make_config()
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    images0, lr0 = np.array(init["images"]), np.array(init["syn_lr"])
    state, history, _ = run_steps(config, dataset, trajectories, 1, state=init)

    # By hand, with the key layout distill documents.
    model = models.build_model(config, C)
    _, unravel = ravel_pytree(inner.init_variables(model, KEY, (HW, HW, 1))["params"])
    key = jax.random.fold_in(KEY, 100)
    pair_key, unroll_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    e = jax.random.randint(jax.random.fold_in(pair_key, 0), (1,), 0, EXPERTS)[0]
    t = jax.random.randint(jax.random.fold_in(pair_key, 1), (1,), 0, 2)[0]
    start, target = unravel(trajectories[e, t]), unravel(trajectories[e, t + 1])
    strategy = augment.strategy_for_dataset("crop_flip", "fake")
    labels = objectives.class_labels(C, IPC)

    def loss_fn(images, lr):
        final = objectives.student_unroll(
            start,
            images,
            labels,
            lr,
            jax.random.split(unroll_key, 1)[0],
            model=model,
            syn_steps=3,
            batch_syn=4,
            dsa_strategy=strategy,
        )
        return objectives.mtt_loss(final, start, target)

    loss, (g_img, g_lr) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        jnp.asarray(images0), jnp.asarray(lr0)
    )
    assert np.isfinite(float(loss)) and 0 < float(loss)
    assert np.all(np.isfinite(g_img)) and np.max(np.abs(g_img)) > 0
    assert np.isfinite(float(g_lr)) and float(g_lr) != 0
    np.testing.assert_allclose(history[0]["loss"], loss, rtol=1e-5)
    tx = optax.sgd(10.0, momentum=0.5)
    upd, _ = tx.update(g_img, tx.init(g_img))
    np.testing.assert_allclose(state["images"], images0 + upd, rtol=1e-5, atol=1e-6)
    # The reference's SGD(lr=mtt.lr_lr, momentum=0.5) on the lr itself; first step: -lr_lr * g.
    np.testing.assert_allclose(state["syn_lr"], lr0 - 1e-5 * g_lr, rtol=1e-6)
    np.testing.assert_allclose(history[0]["syn_lr"], 0.01, rtol=1e-6)
    assert history[0]["skipped"] == 0 and "mi" not in history[0]


def test_mtt_with_mi_and_two_trajectories_learns_heads_and_compiles_once(dataset, trajectories):
    config = make_config(**{"mi.weight": 0.5, "mtt.num_trajectories": 2})
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    proj0 = jax.tree.map(np.array, [h["proj"] for h in init["heads"]])
    state, history, step = run_steps(config, dataset, trajectories, 2, state=init)
    for m in history:
        assert m["mi"].shape == (2,) and np.all(np.isfinite(m["mi"]))
        np.testing.assert_allclose(m["loss"], m["base_loss"] - 0.5 * np.sum(m["mi"]), rtol=1e-5)
    moved = jax.tree.map(
        lambda a, b: np.max(np.abs(np.asarray(a) - b)), [h["proj"] for h in state["heads"]], proj0
    )
    assert min(jax.tree.leaves(moved)) > 0
    assert float(state["syn_lr"]) > 0 and step._cache_size() == 1


def test_mtt_soft_labels_are_learned(dataset, trajectories):
    config = make_config(**{"mtt.learn_labels": True, "mtt.lr_labels": 10.0})
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    logits0 = np.array(init["labels"])
    assert logits0.shape == (C * IPC, C)
    np.testing.assert_array_equal(logits0.argmax(-1), np.repeat(np.arange(C), IPC))
    state, _, _ = run_steps(config, dataset, trajectories, 2, state=init)
    assert np.max(np.abs(np.asarray(state["labels"]) - logits0)) > 0
    probs = state_lib.eval_labels(state)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_mtt_refuses_batch_norm_and_soft_labels_elsewhere(dataset):
    with pytest.raises(ConfigError, match="batch statistics.*'batch'"):
        steps_lib.make_step(make_config(**{"model.norm": "batch"}), dataset)
    from mim4dd_jax import config as config_lib

    with pytest.raises(ConfigError, match="mtt.learn_labels"):
        config_lib.validate(tiny_config("dm,ipc1", **{"mtt.learn_labels": True}))


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("CI"), reason="needs dataset-fashion-mnist"
)
def test_experts_then_mtt_with_mi_end_to_end_on_fashion_mnist(tmp_path):
    small = ["--config.model.width=8", "--config.model.depth=2", "--config.dsa.strategy=crop"]
    experts_dir, workdir = tmp_path / "experts", tmp_path / "mtt"
    r = run_cli(
        "--config=configs/fashion_mnist.py:experts,local",
        f"--workdir={experts_dir}",
        "--config.data.train_per_class=30",
        *small,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # The experts CLI (once for both tests: it was also run on its own before).
    for name in ("expert_000.npz", "expert_001.npz", "meta.json", "results.json"):
        assert (experts_dir / name).exists(), name
    results = json.loads((experts_dir / "results.json").read_text())
    assert (results["num"], results["epochs"]) == (2, 2)
    assert 0 <= results["test_accuracy"]["mean"] <= 1
    r = run_cli(
        "--config=configs/fashion_mnist.py:mtt,ipc1,local",
        f"--workdir={workdir}",
        f"--config.mtt.experts_dir={experts_dir}",
        "--config.mi.weight=0.1",
        "--config.mi.embed_dim=16",
        "--config.distill.iterations=3",
        "--config.distill.batch_real=8",
        "--config.eval.epochs=2",
        "--config.data.train_per_class=30",
        "--config.data.test_per_class=10",
        *small,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:
        assert np.isfinite(row["base_loss"]) and row["syn_lr"] > 0 and len(row["mi"]) == 2
    with np.load(workdir / "distilled.npz") as npz:
        assert npz["images"].shape == (10, 28, 28, 1)
        assert npz["lr"] == pytest.approx(steps[-1]["syn_lr"], rel=0.05)  # the learned lr


def _joint_image_gradient(config, dataset, trajectories, images0, heads, weight):
    """d/d images of mtt_loss + weight * mi_loss, the MI term's synthetic features taken through
    the student after its unroll (so through the unroll), written out with the public parts and
    the key layout steps_mtt documents."""
    from mim4dd_jax import mi, state, steps, steps_core

    model = models.build_model(config, C)
    _, unravel = ravel_pytree(inner.init_variables(model, KEY, (HW, HW, 1))["params"])
    key = jax.random.fold_in(KEY, 100)
    pair_key, unroll_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    real_key, aug_key = jax.random.fold_in(key, 2), jax.random.fold_in(key, 3)
    e = jax.random.randint(jax.random.fold_in(pair_key, 0), (1,), 0, EXPERTS)[0]
    t = jax.random.randint(jax.random.fold_in(pair_key, 1), (1,), 0, 2)[0]
    start, target = unravel(trajectories[e, t]), unravel(trajectories[e, t + 1])
    strategy = augment.strategy_for_dataset("crop_flip", "fake")
    n_real = 5  # distill.batch_real of the tiny config
    index = data.class_index(dataset.train_labels, C)
    real_x = jnp.asarray(dataset.train_images)[data.sample_per_class(real_key, index, n_real)]
    opts = state.mi_config(config.mi)

    def joint(images):
        final = objectives.student_unroll(
            start,
            images,
            objectives.class_labels(C, IPC),
            jnp.float32(0.01),
            jax.random.split(unroll_key, 1)[0],
            model=model,
            syn_steps=3,
            batch_syn=4,
            dsa_strategy=strategy,
        )
        real_blocks, syn_blocks = steps_core.siamese_blocks(
            model,
            {"params": target},
            {"params": final},
            real_x,
            images.reshape(C, IPC, HW, HW, 1),
            aug_key,
            strategy,
            steps.real_chunk(config),
        )
        mi_value, _ = mi.mi_loss(
            mi.Heads(heads, opts),
            real=[jax.lax.stop_gradient(b) for b in real_blocks],
            syn=list(syn_blocks),
            real_labels=objectives.class_labels(C, n_real),
            syn_labels=objectives.class_labels(C, IPC),
        )
        return objectives.mtt_loss(final, start, target) + weight * mi_value

    return jax.grad(joint)(jnp.asarray(images0))


def test_mi_through_the_unroll_is_autodiff_of_the_joint_loss(dataset, trajectories):
    """mi.through_unroll: the image update is SGD on d(base + w * mi)/d images with the MI
    features through the unrolled student; holding the student fixed gives another update, and
    the base gradient is the same either way."""
    weight, updates, histories = 0.5, {}, {}
    for through in (True, False):
        config = make_config(
            **{"mi.weight": weight, "mi.through_unroll": through, "mi.heads": "per_side"}
        )
        init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
        images0 = np.array(init["images"])
        heads = jax.tree.map(np.array, init["heads"])
        state, histories[through], _ = run_steps(config, dataset, trajectories, 1, state=init)
        updates[through] = np.asarray(state["images"]) - images0
    g = _joint_image_gradient(config, dataset, trajectories, images0, heads, weight)
    tx = optax.sgd(10.0, momentum=0.5)
    expected, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(updates[True], expected, rtol=2e-4, atol=1e-6)
    assert np.max(np.abs(updates[True] - updates[False])) > 1e-3 * np.max(np.abs(expected))
    a, b = histories[True][0], histories[False][0]
    np.testing.assert_allclose(a["grad_norm_base"], b["grad_norm_base"], rtol=1e-5)
    np.testing.assert_allclose(a["base_loss"], b["base_loss"], rtol=1e-6)
    assert a["skipped"] == 0 and np.all(np.isfinite(a["mi"]))


def test_mi_through_the_unroll_keeps_the_relative_weight(dataset, trajectories):
    config = make_config(
        **{"mi.weight": 0.3, "mi.weight_mode": "relative", "mi.through_unroll": True}
    )
    _, history, step = run_steps(config, dataset, trajectories, 2)
    for m in history:
        assert m["skipped"] == 0 and m["mi_lambda"] > 0
        np.testing.assert_allclose(m["grad_ratio"], 0.3, rtol=1e-4)
        assert 0 < m["mi_unroll_share"] < 10 and np.isfinite(m["mi_unroll_share"])
    assert step._cache_size() == 1


def test_through_unroll_is_refused_outside_mtt():
    from mim4dd_jax import config as config_lib

    with pytest.raises(ConfigError, match="mi.through_unroll is for method mtt.*'dm'"):
        config_lib.validate(tiny_config("dm,ipc1", **{"mi.through_unroll": True}))
