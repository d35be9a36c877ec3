"""Base-method steps against references written out by hand (issue 12): a DC/DSA iteration (two
outer steps with the network training between them) and the MTT loss's normalisation over the
whole flattened parameter vector.

The references use the library's model, real-batch sampler and DSA ops (tested in their own
files); the gradient-matching distance, the cross-entropy, both SGD loops, the outer/inner loop
structure and the key layout of the ``distill`` module docstring are written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_dataset, tiny_config
from jax.flatten_util import ravel_pytree

from mim4dd_jax import augment, data, inner, models, objectives
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib

C, PER_CLASS, HW, IPC = 3, 12, 8, 2
KEY = jax.random.key(0)
EPS = 1e-6  # the reference's cosine stabiliser (DatasetCondensation distance_wb)


@pytest.fixture(scope="module")
def dataset():
    return fake_dataset(C, PER_CLASS, HW)


# ----------------------------------------------------------------------------------------------
# DC / DSA: one iteration of two outer steps, by hand.
# ----------------------------------------------------------------------------------------------


def ce(logits, labels):
    """Mean cross-entropy of int labels."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(logp[jnp.arange(len(labels)), labels])


def match_distance(g_real, g_syn):
    """Sum over weight leaves and output channels (the last axis) of 1 - cosine; biases and
    norm parameters (1-D) skipped."""
    total = 0.0
    for r, s in zip(jax.tree.leaves(g_real), jax.tree.leaves(g_syn), strict=True):
        if r.ndim < 2:
            continue
        r, s = r.reshape(-1, r.shape[-1]).T, s.reshape(-1, s.shape[-1]).T
        cos = jnp.sum(r * s, -1) / (jnp.linalg.norm(r, axis=-1) * jnp.linalg.norm(s, axis=-1) + EPS)
        total = total + jnp.sum(1.0 - cos)
    return total


def reference_dc(dataset, config, n_iterations):
    """DC/DSA written from the reference's loop: per iteration a fresh network; per outer step
    a fresh real batch, per-class gradient matching (siamese DSA with one key per class), an
    SGD+momentum image update, then (except after the last) ``inner_loop`` epochs of plain SGD
    on the updated synthetic set. Returns (images, [base loss per outer step] per iteration)."""
    model = steps_lib.step_model(config, C)
    strategy = steps_lib.matching_strategy(config, dataset.name)
    d = config.distill
    outer, epochs, n_real = d.outer_loop, d.inner_loop, d.batch_real
    real = jnp.asarray(dataset.train_images)
    index = data.class_index(dataset.train_labels, C)
    labels = np.repeat(np.arange(C), IPC)

    def class_grad(params, x, c):
        return jax.grad(lambda p: ce(model.apply({"params": p}, x), jnp.full(len(x), c)))(params)

    @jax.jit
    def class_matching(syn_c, params, real_c, key_c, c):
        """(distance, its gradient w.r.t. syn_c) for class c."""
        if strategy is not None:  # siamese: the class's key for both sides
            real_c = augment.augment(key_c, real_c, strategy=strategy, siamese=True)
        g_real = jax.lax.stop_gradient(class_grad(params, real_c, c))

        def loss(syn_c):
            if strategy is not None:
                syn_c = augment.augment(key_c, syn_c, strategy=strategy, siamese=True)
            return match_distance(g_real, class_grad(params, syn_c, c))

        return jax.value_and_grad(loss)(syn_c)

    def matching_loss_and_grad(images, params, real_x, aug_key):
        keys = jax.random.split(aug_key, C)
        syn = images.reshape(C, IPC, *images.shape[1:])
        parts = [class_matching(syn[c], params, real_x[c], keys[c], c) for c in range(C)]
        loss = sum(float(value) for value, _ in parts)
        return loss, jnp.concatenate([g for _, g in parts])

    @jax.jit
    def sgd_step(params, x, y, used):
        """Plain SGD on the mean CE of the first ``used`` rows (the rest is padding)."""
        weight = (jnp.arange(len(y)) < used) / used
        loss = lambda p: (
            -jnp.sum(
                weight
                * jax.nn.log_softmax(model.apply({"params": p}, x, train=True))[
                    jnp.arange(len(y)), y
                ]
            )
        )
        return jax.tree.map(lambda p, g: p - d.lr_net * g, params, jax.grad(loss)(params))

    augment_batch = jax.jit(
        lambda key, x: augment.augment(key, x, strategy=strategy, siamese=False)
    )

    def train_net(params, images, key):
        n, bs = len(images), min(d.batch_train, len(images))
        for e in range(epochs):
            ekey = jax.random.fold_in(key, e)
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(ekey, 0), n))
            for b, lo in enumerate(range(0, n, bs)):
                idx = perm[lo : lo + bs]
                used = len(idx)  # the last batch is shorter
                # The library pads it to bs with repeated indices (masked out of the loss) and
                # draws its per-sample DSA for the padded batch.
                idx = np.concatenate([idx, perm[: bs - used]])
                x = images[idx]
                if strategy is not None:
                    x = augment_batch(jax.random.fold_in(jax.random.fold_in(ekey, 1), b), x)
                params = sgd_step(params, x, jnp.asarray(labels[idx]), used)
        return params

    images = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)["images"]
    buf = jnp.zeros_like(images)
    losses = []
    for it in range(n_iterations):
        key = jax.random.fold_in(KEY, 100 + it)
        params = inner.init_variables(model, jax.random.fold_in(key, 0), dataset.image_shape)
        params = params["params"]
        per_outer = []
        for o in range(outer):
            k = jax.random.fold_in(jax.random.fold_in(key, 1), o)
            real_x = real[data.sample_per_class(jax.random.fold_in(k, 0), index, n_real)]
            loss, g = matching_loss_and_grad(images, params, real_x, jax.random.fold_in(k, 1))
            buf = d.momentum * buf + g  # torch SGD(momentum)
            images = images - d.lr * buf
            per_outer.append(float(loss))
            if o < outer - 1:
                train_key = jax.random.fold_in(jax.random.fold_in(key, 2), o)
                params = train_net(params, images, train_key)
        losses.append(per_outer)
    return np.asarray(images), np.asarray(losses)


def library_dc(dataset, config, n_iterations):
    state = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    step = steps_lib.make_step(config, dataset)
    real = jnp.asarray(dataset.train_images)
    index = data.class_index(dataset.train_labels, C)
    losses = []
    for it in range(n_iterations):
        state, metrics = step(state, jax.random.fold_in(KEY, 100 + it), real, index)
        metrics = jax.device_get(metrics)
        assert metrics["skipped"] == 0
        losses.append(np.asarray(metrics["base_loss_outer"]))
    return np.asarray(state["images"]), np.asarray(losses)


# inner_loop 2 epochs of 6 images in batches of 4: a full and a padded batch per epoch. XLA's
# convolution compiles the step in half the time of im2col (the same math, tests/test_conv.py).
TINY_DC = {"model.depth": 1, "distill.inner_loop": 2, "conv_impl": "xla"}
DC_CASES = {"dc": TINY_DC, "dsa": {**TINY_DC, "dsa.strategy": "crop_flip"}}


@pytest.mark.parametrize("method", sorted(DC_CASES))
def test_dc_step_equals_the_hand_written_two_outer_step_reference(dataset, method):
    config = tiny_config(f"{method},ipc{IPC}", **DC_CASES[method])
    assert config.distill.outer_loop == 2 and config.distill.batch_train == 4
    assert (steps_lib.matching_strategy(config, dataset.name) is None) == (method == "dc")
    images, losses = library_dc(dataset, config, 2)
    ref_images, ref_losses = reference_dc(dataset, config, 2)
    assert losses.shape == ref_losses.shape == (2, 2)
    # base_loss_outer[1] is matched on the network after its inner training.
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    np.testing.assert_allclose(images, ref_images, rtol=1e-4, atol=1e-5)
    # The images moved by more than the tolerance (the comparison is not vacuous).
    init = np.asarray(state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)["images"])
    assert np.max(np.abs(images - init)) > 1e-2


# ----------------------------------------------------------------------------------------------
# MTT loss: one normalisation over the whole parameter vector.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params_pair():
    """(start, target): two inits of a small ConvNet; its leaves differ in size and scale."""
    model = models.build_model(tiny_config("mtt,ipc1", **{"model.depth": 1}), C)
    start = inner.init_variables(model, jax.random.key(1), (HW, HW, 1))["params"]
    target = inner.init_variables(model, jax.random.key(2), (HW, HW, 1))["params"]
    return start, target


def _leaf_paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("which", range(4))
def test_mtt_loss_normalises_by_the_whole_flattened_distance(params_pair, which):
    start, target = params_pair
    paths = _leaf_paths(target)
    assert len(paths) >= 4
    moved_path = paths[which]
    rng = np.random.default_rng(which)

    def move(path, leaf):
        if jax.tree_util.keystr(path) != moved_path:
            return leaf
        return leaf + jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32)

    student = jax.tree_util.tree_map_with_path(move, target)
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)
    delta = flat(student) - flat(target)
    assert np.count_nonzero(delta) == np.size(jax.tree.leaves(target)[which])
    expected = np.sum(delta**2) / np.sum((flat(start) - flat(target)) ** 2)
    got = float(objectives.mtt_loss(student, start, target))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A per-leaf normalisation would give a different number here.
    leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[which], np.float64)
    per_leaf = np.sum(delta**2) / np.sum((leaf(start) - leaf(target)) ** 2)
    assert abs(per_leaf - expected) > 1e-2 * expected
