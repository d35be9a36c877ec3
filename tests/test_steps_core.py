"""The MIM4DD term's weight and its diagnostics (issue 13): an absolute-weight step is the
hand-written base + lambda * MI step (images and heads), the relative weight makes the logged
ratio of the two image pulls equal mi.weight for DM, DSA and MTT, the term moves the images
measurably, an image step raises the MI estimate, and MTT's lr and labels get no MI gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_dataset, tiny_config

from mim4dd_jax import augment, data, experts, inner, mi, objectives, state, steps
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib

C, PER_CLASS, HW, IPC = 3, 12, 8, 2
KEY = jax.random.key(0)
MTT = {
    "mtt.syn_steps": 2,
    "mtt.expert_epochs": 1,
    "mtt.max_start_epoch": 2,
    "mtt.batch_syn": 4,
    "mtt.learn_labels": True,
}


@pytest.fixture(scope="module")
def dataset():
    return fake_dataset(C, PER_CLASS, HW)


def make_config(method, **overrides):
    extra = MTT if method == "mtt" else {}
    return tiny_config(f"{method},ipc{IPC}", **{**extra, **overrides})


def fake_trajectories(config, ds):
    """[2, 4, P]: a random init and three small random moves from it, per expert."""
    model = steps_lib.step_model(config, C)
    p = experts.num_params(model, ds.image_shape)
    start = jax.random.normal(jax.random.key(5), (2, 1, p)) * 0.1
    moves = jnp.cumsum(jax.random.normal(jax.random.key(6), (2, 3, p)) * 0.01, axis=1)
    return jnp.concatenate([start, start + moves], axis=1)


def one_step(config, ds, n=1, st=None):
    """n steps from init_state(fold_in(KEY, 0)): (initial state on host, state, last metrics)."""
    st = state_lib.init_state(jax.random.fold_in(KEY, 0), ds, config) if st is None else st
    init = jax.tree.map(lambda a: np.array(a, copy=True), st)
    step = steps.make_step(config, ds)
    real, index = jnp.asarray(ds.train_images), data.class_index(ds.train_labels, C)
    traj = fake_trajectories(config, ds) if config.method == "mtt" else None
    metrics = None
    for it in range(n):
        st, metrics = step(st, jax.random.fold_in(KEY, 100 + it), real, index, traj)
    return init, st, jax.device_get(metrics)


def test_an_absolute_weight_step_is_base_plus_weight_times_mi_by_hand(dataset):
    w, head_lr = 0.7, 0.05
    config = make_config("dm", **{"mi.weight": w, "mi.optimizer": "sgd", "mi.lr": head_lr})
    init, new, metrics = one_step(config, dataset)

    # The DM step written out: keys fold_in(key, 0|1|2) = real batch, network, DSA views.
    key = jax.random.fold_in(KEY, 100)
    rk, nk, ak = (jax.random.fold_in(key, i) for i in range(3))
    model = steps_lib.step_model(config, C)
    strategy = augment.strategy_for_dataset(config.dsa.strategy, dataset.name)
    index = data.class_index(dataset.train_labels, C)
    n_real = int(config.distill.batch_real)
    real_x = jnp.asarray(dataset.train_images)[data.sample_per_class(rk, index, n_real)]
    variables = inner.init_variables(model, nk, dataset.image_shape)
    opts = state.mi_config(config.mi)
    real_labels = jnp.repeat(jnp.arange(C), n_real)
    syn_labels = jnp.repeat(jnp.arange(C), IPC)

    def total(images, heads):
        syn_x = images.reshape(C, IPC, HW, HW, 1)
        base, feats = objectives.dm_loss_and_features(
            variables, real_x, syn_x, ak, model=model, dsa_strategy=strategy
        )
        real_blocks = [jax.lax.stop_gradient(b) for b in feats.real.blocks]
        mi_value, _ = mi.mi_loss(
            mi.Heads(heads, opts),
            real=real_blocks,
            syn=feats.syn.blocks,
            real_labels=real_labels,
            syn_labels=syn_labels,
        )
        return base + w * mi_value

    value, (g_images, g_heads) = jax.value_and_grad(total, argnums=(0, 1))(
        jnp.asarray(init["images"]), init["heads"]
    )
    lr = float(config.distill.lr)  # the first SGD step: momentum has nothing to add yet
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(new["images"]), init["images"] - lr * np.asarray(g_images), rtol=1e-4, atol=1e-6
    )
    expected_heads = jax.tree.map(lambda h, g: h - head_lr * g, init["heads"], g_heads)
    for got, want in zip(
        jax.tree.leaves(new["heads"]), jax.tree.leaves(expected_heads), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)
    # The heads moved (the check above would pass trivially with zero head gradients).
    moved = max(np.max(np.abs(np.asarray(g))) for g in jax.tree.leaves(g_heads))
    assert moved * head_lr > 1e-6
    # The logged pulls: |g_mi| after the weight over |g_base|, and their cosine, by hand.
    base_only = jax.grad(
        lambda im: objectives.dm_loss(
            variables, real_x, im.reshape(C, IPC, HW, HW, 1), ak, model=model, dsa_strategy=strategy
        )
    )(jnp.asarray(init["images"]))
    g_mi = (np.asarray(g_images) - np.asarray(base_only)) / w
    nb, nm = np.linalg.norm(base_only), np.linalg.norm(g_mi)
    np.testing.assert_allclose(metrics["grad_norm_base"], nb, rtol=1e-4)
    np.testing.assert_allclose(metrics["grad_norm_mi"], w * nm, rtol=1e-3)
    np.testing.assert_allclose(metrics["grad_ratio"], w * nm / nb, rtol=1e-3)
    cos = float(np.sum(np.asarray(base_only) * g_mi) / (nb * nm))
    np.testing.assert_allclose(metrics["grad_cos"], cos, atol=1e-3)


@pytest.mark.parametrize("method", ["dm", "dsa", "mtt"])
def test_the_relative_weight_makes_the_logged_ratio_equal_the_weight(dataset, method):
    rho = 0.3
    config = make_config(method, **{"mi.weight": rho, "mi.weight_mode": "relative"})
    _, _, metrics = one_step(config, dataset)
    assert int(metrics["skipped"]) == 0
    assert float(metrics["grad_norm_base"]) > 0 and float(metrics["grad_norm_mi"]) > 0
    if method == "dsa":  # the outer steps' mean of ratios that are each rho
        np.testing.assert_allclose(metrics["grad_ratio"], rho, rtol=1e-4)
    else:
        np.testing.assert_allclose(metrics["grad_ratio"], rho, rtol=1e-5)
        np.testing.assert_allclose(
            metrics["grad_norm_mi"] / metrics["grad_norm_base"], rho, rtol=1e-5
        )
    assert abs(float(metrics["grad_cos"])) <= 1.0 + 1e-6


def test_weight_zero_is_the_base_method_in_both_modes(dataset):
    _, absolute, _ = one_step(make_config("dm"), dataset, n=2)
    relative = make_config("dm", **{"mi.weight_mode": "relative"})
    _, rel, metrics = one_step(relative, dataset, n=2)
    np.testing.assert_array_equal(np.asarray(rel["images"]), np.asarray(absolute["images"]))
    assert "mi" not in metrics and float(metrics["grad_norm_base"]) > 0


def test_twenty_steps_at_rho_0_3_move_the_images_measurably(dataset):
    init, base, _ = one_step(make_config("dm", **{"mi.weight_mode": "relative"}), dataset, n=20)
    config = make_config("dm", **{"mi.weight": 0.3, "mi.weight_mode": "relative"})
    _, with_mi, _ = one_step(config, dataset, n=20)
    moved_by_base = np.linalg.norm(np.asarray(base["images"]) - init["images"])
    moved_by_mi = np.linalg.norm(np.asarray(with_mi["images"]) - np.asarray(base["images"]))
    # An inert term (the old default: 1e-4 of the base pull) gives a ratio of ~1e-4.
    assert moved_by_mi > 0.1 * moved_by_base, (moved_by_mi, moved_by_base)


def test_an_image_step_with_frozen_heads_raises_the_mi_estimate(dataset):
    config = make_config("dm", **{"mi.weight": 1.0})
    st = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    model = steps_lib.step_model(config, C)
    variables = inner.init_variables(model, jax.random.key(3), dataset.image_shape)
    index = data.class_index(dataset.train_labels, C)
    real_x = jnp.asarray(dataset.train_images)[data.sample_per_class(jax.random.key(4), index, 5)]
    real_blocks = model.apply(variables, real_x.reshape(-1, HW, HW, 1), features=True).blocks
    opts = state.mi_config(config.mi)

    def estimate(images):
        syn_blocks = model.apply(variables, images, features=True).blocks
        loss, _ = mi.mi_loss(
            mi.Heads(st["heads"], opts),
            real=real_blocks,
            syn=syn_blocks,
            real_labels=jnp.repeat(jnp.arange(C), 5),
            syn_labels=jnp.repeat(jnp.arange(C), IPC),
        )
        return -loss  # nats, summed over layers

    images = st["images"]
    before, grad = jax.value_and_grad(estimate)(images)
    step = 1e-2 * jnp.linalg.norm(images) / jnp.linalg.norm(grad)
    after = estimate(images + step * grad)
    assert float(after) > float(before) + 1e-3, (float(before), float(after))


def test_mtt_lr_and_labels_get_no_mi_gradient(dataset):
    base_cfg = make_config("mtt")
    mi_cfg = make_config("mtt", **{"mi.weight": 0.3, "mi.weight_mode": "relative"})
    _, base, _ = one_step(base_cfg, dataset)
    st = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, mi_cfg)
    _, with_mi, metrics = one_step(mi_cfg, dataset, st=st)
    assert float(metrics["grad_ratio"]) == pytest.approx(0.3, rel=1e-5)
    for name in ("syn_lr", "labels"):
        np.testing.assert_allclose(
            np.asarray(with_mi[name]), np.asarray(base[name]), rtol=1e-6, atol=1e-9
        )
    assert not np.allclose(np.asarray(with_mi["images"]), np.asarray(base["images"]))


def test_soft_mask_uses_the_learned_label_probabilities(dataset):
    hard = make_config("mtt", **{"mi.weight": 0.3})
    soft = make_config("mtt", **{"mi.weight": 0.3, "mi.mask": "soft"})
    st = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, soft)
    # Learned labels that are far from one-hot, so the soft positives differ from the hard ones.
    st["labels"] = jnp.asarray(st["labels"]) * 0.0 + jax.random.normal(
        jax.random.key(9), st["labels"].shape
    )
    ctx = steps.make_context(soft, dataset, steps.sharding.mesh_from_config(soft))
    probs = ctx.mi_labels(st)
    assert probs.shape == (C * IPC, C)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    hard_ctx = steps.make_context(hard, dataset, steps.sharding.mesh_from_config(hard))
    np.testing.assert_array_equal(np.asarray(hard_ctx.mi_labels(st)), np.repeat(np.arange(C), IPC))
    _, _, m_soft = one_step(soft, dataset, st=jax.tree.map(jnp.array, st))
    _, _, m_hard = one_step(hard, dataset, st=jax.tree.map(jnp.array, st))
    assert not np.allclose(m_soft["mi"], m_hard["mi"])


def test_an_unknown_weight_mode_is_refused_with_the_choices():
    from mim4dd_jax import config as config_lib
    from mim4dd_jax.errors import ConfigError

    c = make_config("dm", **{"mi.weight_mode": "ratio"})
    with pytest.raises(ConfigError, match="'absolute', 'relative'"):
        config_lib.validate(c)
